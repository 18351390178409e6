"""Spectral Signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

Per labelled class, each sample's score is its squared projection, after centring the class's
features, on their top singular vector; the 1.5 * eps highest scores of every class are removed.
ART and BackdoorBench (whose copy of the authors' compute_corr.py does the same) project
uncentred features, which mostly measures the distance from the origin; the paper centres them,
and so do we: a departure from the authors' code.

Assumptions: poisons are at most eps of their class and shift its features along one direction.
It removes 1.5 eps of every class, poisoned or not, by construction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ci_jax.defenses.base import Defense, Result, View, timed
from ci_jax.settings import section, setting


@section
class Settings:
    eps: float = setting(0.1, "assumed upper bound on the poisoned share of a class; 1.5 eps of every "
                         "class is removed", low=0.0, high=2 / 3, low_open=True)


def scores(feats_ND: np.ndarray) -> np.ndarray:
    """Squared projection of each centred feature vector on the top right singular vector."""
    centred_ND = feats_ND - feats_ND.mean(0, keepdims=True)
    if len(feats_ND) < 2 or not np.any(centred_ND):
        return np.zeros(len(feats_ND))
    _, _, vt_DD = np.linalg.svd(centred_ND, full_matrices=False)
    return (centred_ND @ vt_DD[0]) ** 2


def remove_top(view: View, score_fn, share: float) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Per class, the `share` highest scores removed. Returns (score_N, removed_N, classes); each
    class's scores are divided by its cut-off (the lowest removed score), so that one threshold,
    1, separates removed from kept in every class and an ROC over all classes makes sense."""
    score_N = np.zeros(len(view.y_N))
    removed_N = np.zeros(len(view.y_N), bool)
    classes: list[dict[str, Any]] = []
    for c in view.classes():
        idx = np.flatnonzero(view.y_N == c)
        s_n = score_fn(view.feats_ND[idx].astype(np.float64))
        # 1e-9: 1.5 x 0.3 x 100 is 44.99999... in floating point, and 45 images are meant.
        n_remove = min(idx.size, math.floor(share * idx.size + 1e-9))
        order = np.argsort(-s_n, kind="stable")
        gone = idx[order[:n_remove]]
        removed_N[gone] = True
        cut = s_n[order[n_remove - 1]] if n_remove else s_n.max(initial=0.0)
        score_N[idx] = s_n / cut if cut > 0 else 0.0
        entry = {"label": c, "size": int(idx.size), "removed": int(n_remove), **view.poisons_in(idx)}
        if view.is_poison_N is not None:
            entry["removed_poisons"] = int(np.count_nonzero(view.is_poison_N[gone]))
        classes.append(entry)
    return score_N, removed_N, classes


class SS(Defense):
    Settings = Settings

    def run(self, view: View) -> Result:
        (score_N, removed_N, classes), seconds = timed(lambda: remove_top(view, scores, 1.5 * self.s.eps))
        return Result(score_N=score_N, is_clean_N=~removed_N, report={"classes": classes},
                      timings_s={"scoring": seconds})
