"""Defenses that clean a poisoned training set, all fed by one features+predictions pass.

Every defense returns a `Result`: a suspicion score per sample (higher = more suspicious), the
mask of samples it keeps, and a JSON report. `run` picks the one a config names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    score_N: np.ndarray
    is_clean_N: np.ndarray
    report: dict[str, Any]
    timings_s: dict[str, float]


def run(cfg, feats_ND: np.ndarray, pred_N: np.ndarray, y_N: np.ndarray, num_classes: int,
        filtered_pred: Callable[[], np.ndarray], is_poison_N: np.ndarray | None = None,
        cache_dir: Path | None = None, feats_key: str = "") -> Result:
    """The defense `cfg.defense` on a training set's features and predictions.

    filtered_pred: gives the predictions on filtered images; called only by defenses that need
    another model pass (CI), so that AC and SS cost nothing but their own clustering.
    is_poison_N: ground truth, only to count the poisons in each cluster of the report.
    cache_dir, feats_key: where a defense may keep slow intermediate results (CI's mixtures),
    and what identifies the features they came from.
    """
    from ci_jax.defenses import ac, ci, ss  # late: the modules import Result from here

    if cfg.defense == "ci":
        cache = cache_dir / "gmm.json" if cache_dir is not None else None
        return ci.run(feats_ND, pred_N, filtered_pred(), y_N, num_classes, cfg, is_poison_N, cache, feats_key)
    if cfg.defense == "ac":
        return ac.run(feats_ND, y_N, num_classes, cfg, is_poison_N)
    if cfg.defense == "ss":
        return ss.run(feats_ND, y_N, num_classes, cfg, is_poison_N)
    raise ValueError(f"unknown defense {cfg.defense!r}")  # config.validate names the choices


def detect_poison(trainer, x_NHWC: np.ndarray, y_N: np.ndarray, num_classes: int,
                  cfg) -> tuple[dict[str, Any], np.ndarray]:
    """ART's shape: (report, is_clean) for a trained model (`train.Trainer`) and its training set."""
    from ci_jax.defenses import ci

    pred_N, feats_ND = trainer.predict(x_NHWC)
    blur = ci.make_filter(cfg.filter, cfg.filter_param, cfg.seed)
    res = run(cfg, feats_ND, pred_N, y_N, num_classes, lambda: trainer.predict(x_NHWC, transform=blur)[0])
    return res.report, res.is_clean_N


def poisons_in(is_poison_N: np.ndarray | None, idx: np.ndarray) -> dict[str, int]:
    """{"poisons": n} for a report entry, or nothing when the ground truth is unknown."""
    return {} if is_poison_N is None else {"poisons": int(np.count_nonzero(is_poison_N[idx]))}
