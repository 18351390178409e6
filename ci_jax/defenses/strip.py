"""STRIP used as a training-set cleanser (Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence
Against Trojan Attacks on Deep Neural Networks", ACSAC 2019; as backdoor-toolbox's `strip`
cleanser applies it to the training set).

Every training image is superimposed on each of `blends` clean images (x + x_j, no clipping, as
the authors' code), and its score is the mean entropy of the model's softmax over those blends: a
trigger that dominates the decision keeps the blends confidently in the target class, so poisons
have low entropy. The cut-off is set on clean held-out images (the reserve, blended with the same
clean images, which are themselves excluded): the entropy below which a `frr` share of clean
images falls, from a normal fitted to their entropies (the authors' notebook) or their empirical
quantile (backdoor-toolbox). Images below it are removed, whatever their label.

Assumptions: the trigger survives superimposition and dominates the decision. The clean images
come from the reserve, every training image takes `blends` passes; deviation: the paper blends 100
images per input at inference, we default to 16 for the cost of a pass over the whole training set
per blend (the same clean images for every input, as backdoor-toolbox does per batch).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ci_jax.defenses.base import Defense, Result, View, timed
from ci_jax.errors import UserError
from ci_jax.settings import section, setting


@section
class Settings:
    blends: int = setting(16, "clean images each training image is superimposed on", low=1, high=1000)
    frr: float = setting(0.01, "false-rejection rate on clean images that sets the cut-off", low=0.0,
                         high=0.5, low_open=True)
    threshold: str = setting("normal", "cut-off from a normal fitted to the clean entropies (the authors') "
                             "or their empirical quantile (backdoor-toolbox)", choices=("normal", "empirical"))


def entropy_N(logits_NK: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row's softmax."""
    logp = jax.nn.log_softmax(jnp.asarray(logits_NK, jnp.float32), axis=-1)
    return np.asarray(-(jnp.exp(logp) * logp).sum(-1), np.float64)


class STRIP(Defense):
    Settings = Settings
    needs_reserve = True

    def run(self, view: View) -> Result:
        r = view.need_reserve("strip")
        if len(r.y_N) < self.s.blends + 10:
            raise UserError(f"defense strip: --eval.reserve {len(r.y_N)} is too small for {self.s.blends} blend "
                            f"images plus clean images to set the cut-off: raise it to at least {self.s.blends + 10}")
        order = np.random.default_rng([view.seed, 11]).permutation(len(r.y_N))
        overlays, calib = r.x_NHWC[order[:self.s.blends]], order[self.s.blends:]

        def mean_entropy(x_NHWC: np.ndarray, what: str) -> np.ndarray:
            total = np.zeros(len(x_NHWC))
            for j, overlay in enumerate(overlays):
                o = jnp.asarray(overlay)
                _, _, logits = view.predict(x_NHWC, lambda x, o=o: x + o, desc=f"{what} {j + 1}/{len(overlays)}",
                                            logits=True)
                total += entropy_N(logits)
            return total / len(overlays)

        name = f"strip-blends{self.s.blends}-{r.key or 'reserve'}"
        (train_H, clean_H), seconds = timed(lambda: self._entropies(view, name, mean_entropy, r.x_NHWC[calib]))
        mu, sd = stats.norm.fit(clean_H)
        if self.s.threshold == "normal" and sd > 0:
            cut = float(stats.norm.ppf(self.s.frr, mu, sd))
        else:  # the empirical quantile, also where every clean entropy is the same (no normal fits)
            cut = float(np.quantile(clean_H, self.s.frr))
        removed_N = train_H < cut
        images = len(view.y_N) * self.s.blends
        report: dict[str, Any] = {
            "cut_off_entropy": cut, "clean_entropy_mean": float(clean_H.mean()),
            "clean_images_for_cut_off": int(len(clean_H)), "blend_images": int(self.s.blends),
            "removed_per_label": {str(c): int(np.count_nonzero(removed_N & (view.y_N == c))) for c in view.classes()}}
        if cut <= 0:  # entropy is never below 0: a cut-off there removes nothing, whatever the data
            why = (f"the clean entropies (mean {mu:.3g}, sd {sd:.3g}) are far from normal; "
                   f"defense.strip.threshold: empirical takes their {self.s.frr:g} quantile"
                   if self.s.threshold == "normal" else
                   f"a {self.s.frr:g} share of the clean images or more have entropy 0 under every blend")
            report["note"] = (f"the cut-off entropy is {cut:.3g}, at or below 0, the least an entropy can be: "
                              f"nothing can be removed ({why})")
        timings = {"blended_passes": seconds}
        if seconds > 0.5:
            report["blended_images_per_s"] = images / seconds
        # Lower entropy is more suspicious; the cut-off maps to 0.
        return Result(score_N=cut - train_H, is_clean_N=~removed_N, report=report, timings_s=timings)

    def _entropies(self, view: View, name: str, mean_entropy, x_calib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = len(view.y_N), len(x_calib)
        fits = lambda a: a["train"].shape == (n,) and a["clean"].shape == (m,) and \
            np.isfinite(a["train"]).all() and np.isfinite(a["clean"]).all()
        arrays = view.cached(name, lambda: {"train": mean_entropy(view.x_NHWC, "strip train"),
                                            "clean": mean_entropy(x_calib, "strip clean")}, fits)
        return arrays["train"], arrays["clean"]
