"""Spectral Signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

Per labelled class, each sample's score is its squared projection, after centring the class's
features, on their top singular vector; the highest scores are removed. How many, and from which
classes, is the `mode`, one per reference:
- `percentile` (default): floor(1.5 eps n) of every class of n images, the paper's 1.5 eps. At eps
  0.1 this is BackdoorBench's setting (SCLBD/BackdoorBench, detection_pretrain/spectral.py with
  config/detection/spectral/*.yaml `percentile: 85`: the scores above the 85th percentile of every
  class; that count can be one more than floor(0.15 n)). ART's SpectralSignatureDefense is this rule
  at eps = its expected_pp_poison, 0.33 by default: half of every class (spectral_signature_defense.py).
- `every_class`: min(floor(1.5 P), floor(n / 2)) of every class, P the true number of poisons in the
  whole training set (vtu81/backdoor-toolbox, cleansers_tool_box/spectral_signature.py: "we allow
  the oracle here as a baseline"; at most half of a class, "at least a half ... is clean").
- `target_only`: floor(1.5 eps n) of the true target class alone (the authors' code,
  MadryLab/backdoor_data_poisoning compute_corr.py, scores only `target_label` and removes the
  scores above its 85th percentile, `percentile: 85` in config.json: 15 %, our eps 0.1).
The last two use the ground truth (oracle modes, `View.truth`) and say so in the report's "oracle".
Without an attack their budget is 0 and they remove nothing; backdoor-toolbox instead gives a clean
set a 1 % poison rate (cleanser.py), which we do not copy: a budget derived from the truth is 0.

ART and BackdoorBench (whose copy of the authors' compute_corr.py does the same) project
uncentred features, which mostly measures the distance from the origin; the paper centres them,
and so do we, as backdoor-toolbox does: a departure from the authors' code.

Assumptions: poisons are at most eps of their class (`every_class`: it knows their number) and shift
its features along one direction. `percentile` and `every_class` remove from every class, poisoned or
not, by construction.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ci_jax.defenses.base import Defense, Result, View, timed
from ci_jax.settings import section, setting

MODES: tuple[str, ...] = ("percentile", "every_class", "target_only")


@section
class Settings:
    eps: float = setting(0.1, "assumed upper bound on the poisoned share of a class; 1.5 eps of a class is "
                         "removed (modes percentile and target_only)", low=0.0, high=2 / 3, low_open=True)
    mode: str = setting("percentile", "which classes lose how many: percentile, 1.5 eps of every class "
                        "(BackdoorBench detection_pretrain/spectral.py, percentile 85); every_class, 1.5 x the "
                        "true poison count from every class, at most half of it (backdoor-toolbox "
                        "cleansers_tool_box/spectral_signature.py; oracle); target_only, 1.5 eps of the true "
                        "target class only (the authors' MadryLab/backdoor_data_poisoning compute_corr.py; oracle)",
                        choices=MODES)


def scores(feats_ND: np.ndarray) -> np.ndarray:
    """Squared projection of each centred feature vector on the top right singular vector."""
    centred_ND = feats_ND - feats_ND.mean(0, keepdims=True)
    if len(feats_ND) < 2 or not np.any(centred_ND):
        return np.zeros(len(feats_ND))
    _, _, vt_DD = np.linalg.svd(centred_ND, full_matrices=False)
    return (centred_ND @ vt_DD[0]) ** 2


def share_of(share: float) -> Callable[[int, int], int]:
    """A budget of floor(share x n) images of every class of n."""
    # 1e-9: 1.5 x 0.3 x 100 is 44.99999... in floating point, and 45 images are meant.
    return lambda label, n: min(n, math.floor(share * n + 1e-9))


def budget(view: View, s: Settings) -> tuple[Callable[[int, int], int], str | None]:
    """(images to remove from class `label` of n images, what the mode took from the ground truth)."""
    if s.mode == "percentile":
        return share_of(1.5 * s.eps), None
    truth = view.need_truth("ss", s.mode)
    if s.mode == "every_class":
        cap = math.floor(1.5 * truth.poisons)
        said = (f"the true poison count, {truth.poisons}: every class loses min({cap}, half its size)"
                + ("; no attack, so nothing is removed" if truth.poisons == 0 else ""))
        return lambda label, n: min(cap, n // 2), said
    part = share_of(1.5 * s.eps)
    if truth.target is None:
        return lambda label, n: 0, "the true target class: no attack, so nothing is removed"
    return lambda label, n: part(label, n) if label == truth.target else 0, f"the true target class, {truth.target}"


def remove_top(view: View, score_fn, count: Callable[[int, int], int]
               ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Per class, the `count(label, size)` highest scores removed. Returns (score_N, removed_N,
    classes); each class's scores are divided by its cut-off (the lowest removed score), so that
    one threshold, 1, separates removed from kept in every class and an ROC over all classes makes
    sense."""
    score_N = np.zeros(len(view.y_N))
    removed_N = np.zeros(len(view.y_N), bool)
    classes: list[dict[str, Any]] = []
    for c in view.classes():
        idx = np.flatnonzero(view.y_N == c)
        s_n = score_fn(view.feats_ND[idx].astype(np.float64))
        n_remove = count(c, idx.size)
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

    def oracle(self) -> bool:
        return self.s.mode != "percentile"

    def run(self, view: View) -> Result:
        count, oracle = budget(view, self.s)
        (score_N, removed_N, classes), seconds = timed(lambda: remove_top(view, scores, count))
        report: dict[str, Any] = {"classes": classes}
        if oracle is not None:
            report["oracle"] = oracle
        return Result(score_N=score_N, is_clean_N=~removed_N, report=report, timings_s={"scoring": seconds})
