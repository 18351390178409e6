"""SCALE-UP (Guo, Li, Chen, Guo, Sun, Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor
Detection via Analyzing Scaled Prediction Consistency", ICLR 2023; the authors' release
github.com/JunfengGo/SCALE-UP, BackdoorBox's core/defenses/SCALE_UP.py by the same group, and
backdoor-toolbox's other_defenses_tool_box/scale_up.py), used as a training-set cleanser.

Every image is amplified pixel-wise, clip(k x, 0, 1) for each scale k of the set (the `amplify`
perturbation, each scale its own cached pass), and its scaled prediction consistency is the share
of scales whose decision equals the model's decision on the image: SPC = mean_k 1[C(k x) = C(x)].
A trigger dominates the decision and survives amplification, so poisons keep their decision; clean
decisions drift as the image saturates. Data-free, an image is flagged when SPC >= T. Data-limited,
the SPC is first standardised by the mean and sd of clean images' SPC (the reserve): the
references take one mean and sd over all clean images (`normalise: global`); `class` takes them
over the clean images of the same decision, since clean SPC differs between classes. The score is
the (standardised) SPC: higher is more suspicious.

Defaults: scales 1, 2, ..., 11 as the authors' release (it counts the scale-1 decision, the image's
own, among the 11; BackdoorBox takes 3, 5, 7, 9, 11 and backdoor-toolbox 3, 5, 7: set min_scale,
max_scale, scale_step), the data-limited form with one mean and sd, and BackdoorBox's T = 0.5.

Assumptions: the trigger survives amplification and keeps deciding; the images are in [0, 1]. On
near-binary images (MNIST digits) amplification changes little and clean SPC is high too.

Deviations: the paper tests inputs at inference, we score the training set (as STRIP here). The
clean SPC is measured against the model's decision on each clean image, as for every scored image
(the references' normalisation compares the clean images' scaled decisions to their true labels).
A clean sd of 0 (every clean image equally consistent) is taken as SD_FLOOR, so an image more
consistent than every clean one is far above T and one as consistent is at 0; a class with fewer
than 2 clean images takes the global mean and sd. `cut: frr` replaces T by the score that at most
`frr` of the clean reserve reach (the paper leaves T to the defender).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ci_jax import perturbations
from ci_jax.defenses.base import CUTS, Defense, Reserve, Result, View, cut_off, timed
from ci_jax.errors import UserError
from ci_jax.settings import section, setting

NORMALISE: tuple[str, ...] = ("global", "class", "none")
SD_FLOOR = 1e-3


@section
class Settings:
    min_scale: int = setting(1, "smallest amplification factor: the scales are min_scale, min_scale + scale_step, "
                             "..., up to max_scale", low=1, high=1000)
    max_scale: int = setting(11, "largest amplification factor", low=1, high=1000)
    scale_step: int = setting(1, "step between amplification factors", low=1, high=1000)
    normalise: str = setting("global", "standardise the SPC by the clean reserve's mean and sd: over all of it "
                             "(global, the references' data-limited form), over its images of the same decision "
                             "(class), or not at all (none: data-free)", choices=NORMALISE)
    threshold: float = setting(0.5, "cut threshold: flag an image whose (standardised) SPC is at least this "
                               "(BackdoorBox's T)")
    cut: str = setting("threshold", "flag from the threshold (the paper's), or from the score that at most frr "
                       "of the clean reserve reach (frr)", choices=CUTS)
    frr: float = setting(0.01, "cut frr: the share of clean reserve images that may be flagged", low=0.0, high=0.5,
                         low_open=True)

    def check(self) -> None:
        if self.min_scale > self.max_scale:
            raise UserError(f"defense.scale_up.min_scale {self.min_scale} is above max_scale {self.max_scale}")

    def scales(self) -> list[int]:
        return list(range(self.min_scale, self.max_scale + 1, self.scale_step))


def standardise(spc_N: np.ndarray, pred_N: np.ndarray, clean_M: np.ndarray, clean_pred_M: np.ndarray,
                how: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(score_N, clean score_M, statistics): the SPC of scored and clean images standardised by the
    clean images' mean and sd (over all of them, or per decision), or as it is (none)."""
    if how == "none":
        return spc_N, clean_M, {}
    mu = float(clean_M.mean())
    sd = float(clean_M.std(ddof=1)) if len(clean_M) > 1 else 0.0
    stats: dict[str, Any] = {"clean_spc_mean": mu, "clean_spc_sd": sd}
    mu_N, sd_N = np.full(len(spc_N), mu), np.full(len(spc_N), sd)
    mu_M, sd_M = np.full(len(clean_M), mu), np.full(len(clean_M), sd)
    if how == "class":
        per: dict[str, Any] = {}
        for c in np.union1d(pred_N, clean_pred_M):
            own, scored = clean_pred_M == c, pred_N == c
            if own.sum() < 2:  # the global mean and sd
                per[str(int(c))] = {"clean_images": int(own.sum()), "mean": None, "sd": None}
                continue
            m, s = float(clean_M[own].mean()), float(clean_M[own].std(ddof=1))
            mu_N[scored], sd_N[scored], mu_M[own], sd_M[own] = m, s, m, s
            per[str(int(c))] = {"clean_images": int(own.sum()), "mean": m, "sd": s}
        stats["per_decision"] = per
    return (spc_N - mu_N) / np.maximum(sd_N, SD_FLOOR), (clean_M - mu_M) / np.maximum(sd_M, SD_FLOOR), stats


class ScaleUp(Defense):
    Settings = Settings
    needs_reserve = True

    def run(self, view: View) -> Result:
        r = view.need_reserve("scale_up")
        scales = self.s.scales()
        (train_SN, clean_SM), seconds = timed(lambda: self.decisions(view, r, scales))
        spc_N = (train_SN == view.pred_N).mean(0)
        clean_spc_M = (clean_SM == r.pred_N).mean(0)
        score_N, clean_M, stats = standardise(spc_N, view.pred_N, clean_spc_M, r.pred_N, self.s.normalise)
        cut = cut_off(clean_M, self.s.cut, self.s.threshold, self.s.frr)
        removed_N = score_N >= cut
        consistent_N = np.rint(spc_N * len(scales)).astype(np.int64)
        report: dict[str, Any] = {
            "scales": scales, "normalise": self.s.normalise, **stats, "cut_off": cut,
            "clean_flagged_share": float(np.mean(clean_M >= cut)), "clean_images": int(len(clean_M)),
            "consistent_scales_counts": {str(j): int(np.count_nonzero(consistent_N == j))
                                         for j in range(len(scales) + 1)},
            "removed_per_label": {str(c): int(np.count_nonzero(removed_N & (view.y_N == c))) for c in view.classes()}}
        return Result(score_N=score_N, is_clean_N=~removed_N, report=report, timings_s={"scaled_passes": seconds})

    @staticmethod
    def decisions(view: View, r: Reserve, scales: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(train_SN, clean_SM): the decisions at each scale on the training images and the reserve;
        at scale 1 the model's own (clip(x, 0, 1) is x)."""
        amplify = perturbations.get("amplify")
        train, clean = [], []
        for k in scales:
            if k == 1:
                train.append(view.pred_N)
                clean.append(r.pred_N)
                continue
            a = amplify.make(amplify.settings(factor=float(k)), view.seed)
            train.append(view.train_pass(a.name, a.transform))
            clean.append(view.reserve_pass(a.name, a.transform))
        return np.stack(train), np.stack(clean)
