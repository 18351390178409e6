"""Spectral Signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", 2018).

Per labelled class, each sample's score is its squared projection, after centring the class's
features, on their top singular vector; the 1.5 * eps highest scores of every class are removed.
ART and BackdoorBench project uncentred features, which mostly measures the distance from the
origin; the paper centres them, and so do we.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ci_jax.config import Config
from ci_jax.defenses import Result, poisons_in


def scores(feats_ND: np.ndarray) -> np.ndarray:
    """Squared projection of each centred feature vector on the top right singular vector."""
    centred_ND = feats_ND - feats_ND.mean(0, keepdims=True)
    if len(feats_ND) < 2 or not np.any(centred_ND):
        return np.zeros(len(feats_ND))
    _, _, vt_DD = np.linalg.svd(centred_ND, full_matrices=False)
    return (centred_ND @ vt_DD[0]) ** 2


def run(feats_ND: np.ndarray, y_N: np.ndarray, num_classes: int, cfg: Config,
        is_poison_N: np.ndarray | None = None) -> Result:
    t0 = time.perf_counter()
    score_N = np.zeros(len(y_N))
    removed_N = np.zeros(len(y_N), bool)
    classes: list[dict[str, Any]] = []
    for c in range(num_classes):
        idx = np.flatnonzero(y_N == c)
        if idx.size == 0:
            continue
        s_n = scores(feats_ND[idx].astype(np.float64))
        n_remove = min(idx.size, math.floor(1.5 * cfg.ss_eps * idx.size))
        order = np.argsort(-s_n, kind="stable")
        gone = idx[order[:n_remove]]
        removed_N[gone] = True
        # Scaled by the class's cut-off (the lowest removed score), so that one threshold, 1,
        # separates removed from kept in every class and an ROC over all classes makes sense.
        cut = s_n[order[n_remove - 1]] if n_remove else s_n.max(initial=0.0)
        score_N[idx] = s_n / cut if cut > 0 else 0.0
        entry = {"label": c, "size": int(idx.size), "removed": int(n_remove), **poisons_in(is_poison_N, idx)}
        if is_poison_N is not None:
            entry["removed_poisons"] = int(np.count_nonzero(is_poison_N[gone]))
        classes.append(entry)
    report = {"method": "ss", "removed": int(removed_N.sum()), "classes": classes}
    return Result(score_N=score_N, is_clean_N=~removed_N, report=report,
                  timings_s={"defense": time.perf_counter() - t0})
