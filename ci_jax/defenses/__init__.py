"""Defenses that clean a poisoned training set, each a plug-in: one module, one line below.

Every defense receives a `View` of the trained baseline (cached features and decisions of the
training set, a `predict` for extra passes, the labels, a cache directory) and returns a `Result`:
a suspicion score per sample, the mask of samples it keeps, and its own report section.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ci_jax.defenses import ac, ci, ibd_psc, scale_up, scan, spectre, ss, strip
from ci_jax.defenses.base import Defense, Reserve, Result, Truth, View
from ci_jax.errors import UserError, unknown_name
from ci_jax.perturbations import bn_scale

REGISTRY: dict[str, type[Defense]] = {
    "ci": ci.CI,
    "ac": ac.AC,
    "ss": ss.SS,
    "spectre": spectre.SPECTRE,
    "scan": scan.SCAn,
    "strip": strip.STRIP,
    "scale_up": scale_up.ScaleUp,
    "ibd_psc": ibd_psc.IBDPSC,
}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def build(name: str, settings: Any) -> Defense:
    if name not in REGISTRY:
        raise unknown_name("defense", name, NAMES)
    return REGISTRY[name](settings)


def detect_poison(trainer, x_NHWC: np.ndarray, y_N: np.ndarray, num_classes: int, cfg,
                  reserve: Reserve | None = None, truth: Truth | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """ART's shape: (report, is_clean) for a trained model (`train.Trainer`) and its training set,
    with the defense `cfg.defense.name` at its settings in `cfg`. Nothing is cached. truth: the
    attack's poison count and target, for an oracle mode (e.g. defense.ss.mode every_class)."""
    defense = build(cfg.defense.name, getattr(cfg.defense, cfg.defense.name))
    defense.check(tuple(x_NHWC.shape[1:]), num_classes)
    if defense.oracle() and truth is None:
        raise UserError(f"defense {cfg.defense.name}: its mode uses the true poison count and target class: "
                        "pass truth=Truth(poisons, target)")
    pred_N, feats_ND = trainer.predict(x_NHWC)
    view = View(x_NHWC=x_NHWC, y_N=np.asarray(y_N), feats_ND=feats_ND, pred_N=pred_N,
                num_classes=num_classes, predict=trainer.predict, seed=cfg.seed, reserve=reserve,
                truth=truth,
                bn_layers=bn_scale.count_layers(trainer.eval_def, trainer.model_state) if hasattr(trainer, "eval_def")
                else None)  # a stand-in trainer without a model: unknown
    result = defense.run(view)
    return result.report, result.is_clean_N


__all__ = ["REGISTRY", "NAMES", "Defense", "Reserve", "Result", "Truth", "View", "build", "detect_poison"]
