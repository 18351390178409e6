"""IBD-PSC (Hou, Zhang, Wang, Wang, Guo, Zheng, Li, "IBD-PSC: Input-level Backdoor Detection via
Parameter-oriented Scaling Consistency", ICML 2024; BackdoorBox's core/defenses/IBD_PSC.py by the
authors' group and backdoor-toolbox's other_defenses_tool_box/IBD_PSC.py), used as a training-set
cleanser.

Amplifying the scale (gamma) and bias (beta) of a model's last BatchNorm layers by a factor omega
(the `bn_scale` perturbation, a transformed copy of the model) destroys clean decisions, while a
backdoor's decisions keep their confidence. Layer selection, on clean data (the reserve): the
fewest last layers k whose scaling takes the clean error above xi. The n amplified models then
scale the last k + 1, ..., k + n layers, and an image's parameter-oriented scaling consistency is
the mean over them of the softmax probability of the class the original model decides:
PSC(x) = 1/n sum_i softmax(f_i(x))[C(x)]. An image is flagged when PSC >= T. The score is the PSC:
higher is more suspicious.

Defaults: the references' n = 5, omega = 1.5, xi = 0.6 and T = 0.9.

Assumptions: the model has BatchNorm layers (ResNets; not the small CNN), counted in the order the
forward pass runs them (see perturbations/bn_scale.py); the trigger's path survives the scaling.

Deviations: the paper tests inputs at inference, we score the training set (as STRIP here). Where
no k < L (the model's BatchNorm layers) takes the clean error above xi, the references fail (their
selection returns nothing); we take k = max(1, L - n), the n deepest scalings, and the report says
so. As in the references, a model past the last layer scales all L (k + i capped at L), so fewer
than n distinct models take part. `cut: frr` replaces T by the score that at most `frr` of the
clean reserve reach (the paper leaves T to the defender).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from ci_jax import perturbations
from ci_jax.defenses.base import CUTS, Defense, Result, View, cut_off, timed
from ci_jax.errors import UserError
from ci_jax.settings import section, setting


@section
class Settings:
    n: int = setting(5, "amplified models: scaling the last k + 1, ..., k + n BatchNorm layers", low=1, high=100)
    factor: float = setting(1.5, "factor on the scale and bias of the BatchNorm layers scaled (omega)", low=0.0,
                            high=1e6, low_open=True)
    xi: float = setting(0.6, "layer selection: k is the fewest last BatchNorm layers whose scaling takes the clean "
                        "reserve's error above xi", low=0.0, high=1.0)
    threshold: float = setting(0.9, "cut threshold: flag an image whose PSC is at least this (T)", low=0.0, high=1.0)
    cut: str = setting("threshold", "flag from the threshold (the paper's), or from the score that at most frr "
                       "of the clean reserve reach (frr)", choices=CUTS)
    frr: float = setting(0.01, "cut frr: the share of clean reserve images that may be flagged", low=0.0, high=0.5,
                         low_open=True)


def confidence_N(logits_NK: np.ndarray, pred_N: np.ndarray) -> np.ndarray:
    """The softmax probability of each row's class pred_N."""
    logp_NK = special.log_softmax(np.asarray(logits_NK, np.float64), axis=-1)
    return np.exp(logp_NK[np.arange(len(pred_N)), pred_N])


class IBDPSC(Defense):
    Settings = Settings
    needs_reserve = True

    def run(self, view: View) -> Result:
        r = view.need_reserve("ibd_psc")
        if not view.bn_layers:
            what = "unknown to this view" if view.bn_layers is None else "none: it has no BatchNorm"
            raise UserError(f"defense ibd_psc scales the model's BatchNorm layers, and they are {what}: "
                            "train a model with BatchNorm (--train.model resnet20, resnet18 or preact_resnet18)")
        (selection, t_select) = timed(lambda: self.select(view))
        start, layers = selection["start"], view.bn_layers
        models = [min(start + i, layers) for i in range(1, self.s.n + 1)]
        ((psc_N, clean_M), t_score) = timed(lambda: self.psc(view, models))
        cut = cut_off(clean_M, self.s.cut, self.s.threshold, self.s.frr)
        removed_N = psc_N >= cut
        report: dict[str, Any] = {
            "bn_layers": layers, "factor": self.s.factor, "layer_selection": selection,
            "models_scale_last": models, "clean_psc_mean": float(clean_M.mean()), "cut_off": cut,
            "clean_flagged_share": float(np.mean(clean_M >= cut)), "clean_images": int(len(r.y_N)),
            "removed_per_label": {str(c): int(np.count_nonzero(removed_N & (view.y_N == c))) for c in view.classes()}}
        return Result(score_N=psc_N, is_clean_N=~removed_N, report=report,
                      timings_s={"layer_selection": t_select, "scaled_passes": t_score})

    def scaled(self, view: View, layers: int) -> perturbations.Applied:
        bn = perturbations.get("bn_scale")
        return bn.make(bn.settings(factor=self.s.factor, layers=layers), view.seed)

    def select(self, view: View) -> dict[str, Any]:
        """k: the fewest last layers, of 1, ..., L - 1, whose scaling takes the reserve's error
        (against its true labels) above xi, with the error of each k tried."""
        r = view.reserve
        errors: dict[str, float] = {}
        for k in range(1, view.bn_layers):
            a = self.scaled(view, k)
            errors[str(k)] = float(np.mean(view.reserve_pass(a.name, model=a.model) != r.y_N))
            if errors[str(k)] > self.s.xi:
                return {"clean_error": errors, "xi": self.s.xi, "start": k, "reached_xi": True}
        return {"clean_error": errors, "xi": self.s.xi, "start": max(1, view.bn_layers - self.s.n), "reached_xi": False}

    def psc(self, view: View, models: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(PSC of each training image, PSC of each reserve image): the mean confidence in the
        original decision over the amplified models (a model repeated counts again)."""
        r = view.reserve
        per_model: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in dict.fromkeys(models):
            a = self.scaled(view, k)
            per_model[k] = (confidence_N(view.train_pass(a.name, model=a.model, logits=True), view.pred_N),
                            confidence_N(view.reserve_pass(a.name, model=a.model, logits=True), r.pred_N))
        return (sum(per_model[k][0] for k in models) / len(models),
                sum(per_model[k][1] for k in models) / len(models))
