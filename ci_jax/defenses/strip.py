"""STRIP used as a training-set cleanser (Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence
Against Trojan Attacks on Deep Neural Networks", ACSAC 2019; as backdoor-toolbox's and
BackdoorBench's `strip` cleansers apply it to the training set).

In each of `blends` (N) passes every training image is superimposed on a clean image of its own,
drawn at random from the reserve (x + x_j, no clipping, as the authors' notebook and both toolboxes
with strip_alpha 1.0), and its score is the mean entropy of the model's softmax over its N blends: a
trigger that dominates the decision keeps the blends confidently in the target class, so poisons
have low entropy. The reserve's own images, each blended with N other reserve images, give the
clean entropies that set the cut-off: the entropy below which an `frr` share of clean images falls,
- `normal`: from a normal fitted to them, at FRR 1 % (the authors' notebook, garrisongys/STRIP
  STRIP_CIFAR10DeepArchit_Tb.ipynb: scipy.stats.norm.ppf(0.01, mu, sigma));
- `empirical`: their order statistic, sorted[floor(frr m)] of m, at FRR 10 % (vtu81/backdoor-toolbox
  cleansers_tool_box/strip.py and SCLBD/BackdoorBench detection_infer/strip.py, defense_fpr=0.1).
Images below it are removed, whatever their label. Where every clean entropy is the same no normal
fits, and the empirical rule is used.

Overlays: the paper draws N overlays per input (np.random.randint in entropyCal), the toolboxes N
per batch of 128 inputs, both with N = 100. We redraw per image, seeded: image i in pass j takes
reserve image idx_j[i], idx_j drawn by numpy from (seed, pass j), with replacement as the paper's
(a reserve image never overlays itself). Each pass blends the whole set on the device in one
program of fixed shapes and runs it through the model; its entropies are summed on the host. The
entropies are cached per baseline, reserve, N and seed; both cut-off rules read the same cache.

Assumptions: the trigger survives superimposition and dominates the decision; the reserve is clean.
Cost: N passes over the training set plus N over the reserve.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ci_jax.defenses.base import Defense, Predict, Result, View, timed
from ci_jax.errors import UserError
from ci_jax.settings import section, setting

THRESHOLDS: tuple[str, ...] = ("normal", "empirical")
MIN_RESERVE = 10  # clean images to blend among and to set a cut-off on
_STREAM = 11  # of the run's seed: the overlay draws


@section
class Settings:
    blends: int = setting(100, "N: passes, in each of which every image is superimposed on its own clean reserve "
                          "image, redrawn per pass (the paper and both toolboxes: 100)", low=1, high=1000)
    frr: float = setting(0.01, "false-rejection rate on clean images that sets the cut-off (the paper: 0.01; "
                         "backdoor-toolbox and BackdoorBench: 0.1)", low=0.0, high=0.5, low_open=True)
    threshold: str = setting("normal", "cut-off from a normal fitted to the clean entropies (the authors' "
                             "notebook) or their empirical quantile, sorted[floor(frr m)] (backdoor-toolbox "
                             "cleansers_tool_box/strip.py, BackdoorBench detection_infer/strip.py)",
                             choices=THRESHOLDS)


def entropy_N(logits_NK: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row's softmax."""
    logp = jax.nn.log_softmax(jnp.asarray(logits_NK, jnp.float32), axis=-1)
    return np.asarray(-(jnp.exp(logp) * logp).sum(-1), np.float64)


def overlay_indices(seed: int, stream: int, j: int, n: int, m: int, exclude_self: bool = False) -> np.ndarray:
    """Which of m reserve images overlays each of n images in pass j: a seeded draw per image, with
    replacement; exclude_self (the n images are the reserve itself): image i never draws itself."""
    rng = np.random.default_rng([seed, _STREAM, stream, j])
    if not exclude_self:
        return rng.integers(0, m, n).astype(np.int32)
    idx = rng.integers(0, m - 1, n)
    return (idx + (idx >= np.arange(n))).astype(np.int32)


@jax.jit
def _blend(x_NHWC: jax.Array, pool_MHWC: jax.Array, idx_N: jax.Array) -> jax.Array:
    return x_NHWC + pool_MHWC[idx_N]


def pass_entropies(predict: Predict, x_NHWC: np.ndarray, pool_MHWC: np.ndarray, blends: int, seed: int,
                   stream: int, exclude_self: bool = False, desc: str = "strip") -> Iterator[np.ndarray]:
    """The entropy of every image's blend in each of `blends` passes, pass by pass. The images and
    the pool stay on the device; one blended copy of the images exists at a time."""
    x, pool = jnp.asarray(x_NHWC), jnp.asarray(pool_MHWC)
    n, m = len(x_NHWC), len(pool_MHWC)
    for j in range(blends):
        idx = overlay_indices(seed, stream, j, n, m, exclude_self)
        _, _, logits = predict(_blend(x, pool, jnp.asarray(idx)), None, desc=f"{desc} {j + 1}/{blends}", logits=True)
        yield entropy_N(logits)


def mean_entropy(predict: Predict, x_NHWC: np.ndarray, pool_MHWC: np.ndarray, blends: int, seed: int,
                 stream: int, exclude_self: bool = False, desc: str = "strip") -> np.ndarray:
    total = np.zeros(len(x_NHWC))
    for h in pass_entropies(predict, x_NHWC, pool_MHWC, blends, seed, stream, exclude_self, desc):
        total += h
    return total / blends


def cut_off(clean_H: np.ndarray, threshold: str, frr: float) -> float:
    """The entropy below which images are removed: the normal's or the empirical frr-quantile of the
    clean entropies (the empirical one where they are all alike: no normal fits)."""
    mu, sd = stats.norm.fit(clean_H)
    if threshold == "normal" and sd > 0:
        return float(stats.norm.ppf(frr, mu, sd))
    # The toolboxes' order statistic: at most frr of the clean images lie strictly below it.
    return float(np.sort(clean_H)[int(frr * len(clean_H))])


class STRIP(Defense):
    Settings = Settings
    needs_reserve = True

    def run(self, view: View) -> Result:
        r = view.need_reserve("strip")
        if len(r.y_N) < MIN_RESERVE:
            raise UserError(f"defense strip: --eval.reserve {len(r.y_N)} is too small to blend among and set a "
                            f"cut-off on: raise it to at least {MIN_RESERVE} (the references use 1,000 or more)")
        name = f"strip-add-redrawn-blends{self.s.blends}-seed{view.seed}-{r.key or 'reserve'}"
        (train_H, clean_H), seconds = timed(lambda: self._entropies(view, name))
        cut = cut_off(clean_H, self.s.threshold, self.s.frr)
        removed_N = train_H < cut
        report: dict[str, Any] = {
            "cut_off_entropy": cut, "clean_entropy_mean": float(clean_H.mean()),
            "clean_images_for_cut_off": int(len(clean_H)), "blend_images": int(self.s.blends),
            "removed_per_label": {str(c): int(np.count_nonzero(removed_N & (view.y_N == c))) for c in view.classes()}}
        if cut <= 0:  # entropy is never below 0: a cut-off there removes nothing, whatever the data
            mu, sd = stats.norm.fit(clean_H)
            why = (f"the clean entropies (mean {mu:.3g}, sd {sd:.3g}) are far from normal; "
                   f"defense.strip.threshold: empirical takes their {self.s.frr:g} quantile"
                   if self.s.threshold == "normal" else
                   f"a {self.s.frr:g} share of the clean images or more have entropy 0 under every blend")
            report["note"] = (f"the cut-off entropy is {cut:.3g}, at or below 0, the least an entropy can be: "
                              f"nothing can be removed ({why})")
        if seconds > 0.5:
            report["blended_images_per_s"] = (len(train_H) + len(clean_H)) * self.s.blends / seconds
        # Lower entropy is more suspicious; the cut-off maps to 0.
        return Result(score_N=cut - train_H, is_clean_N=~removed_N, report=report,
                      timings_s={"blended_passes": seconds})

    def _entropies(self, view: View, name: str) -> tuple[np.ndarray, np.ndarray]:
        r = view.need_reserve("strip")
        n, m, s = len(view.y_N), len(r.y_N), self.s
        fits = lambda a: a["train"].shape == (n,) and a["clean"].shape == (m,) and \
            np.isfinite(a["train"]).all() and np.isfinite(a["clean"]).all()
        arrays = view.cached(name, lambda: {
            "train": mean_entropy(view.predict, view.x_NHWC, r.x_NHWC, s.blends, view.seed, 0, desc="strip train"),
            "clean": mean_entropy(view.predict, r.x_NHWC, r.x_NHWC, s.blends, view.seed, 1, exclude_self=True,
                                  desc="strip clean")}, fits)
        return arrays["train"], arrays["clean"]
