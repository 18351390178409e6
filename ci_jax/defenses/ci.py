"""Cluster Impurity (Xiang, Miller, Kesidis, "A Benchmark Study of Backdoor Data Poisoning Defenses
for Deep Neural Network Classifiers and a Novel Defense", MLSP 2019).

Per labelled class, a Gaussian mixture over the penultimate features (number of components by
BIC) splits the class into components. A backdoor's poisons form their own component, and the
model decides them by the trigger, not by the content: a mild filter that destroys a small trigger
flips their decisions, while clean images keep theirs. A component's impurity is
KL([1, 0] || [p, 1 - p]) = -log p, p the share of its images whose decision survives the filter.

Assumptions: the poisons of a class form their own component, and the filter destroys their
trigger but not the content of clean images. A global trigger (blend, chessboard) survives a
3x3 median, and an attack whose poisons mix with clean images defeats the clustering.

Beyond the paper:
- a filter bank: several filters, each its own cached pass; a component's impurity is its largest
  over the bank. A filter is any perturbation of `ci_jax.perturbations` (input or model), at its
  settings or at a strength (NAME@S);
- the `test` rule, which controls false alarms whatever the filter's strength and the data. Per
  filter, every component's flip share r is put on the binomial's variance-stabilising scale
  a = asin(sqrt(r)); the clean components' location and spread are estimated robustly (the median,
  and the mean deviation above it of a band of the upper half that leaves out its top tenth and
  anything beyond four quartile-spreads: clean shares trail off to the right, the side tested),
  the spread beyond binomial noise kept, since clean components differ in how many of their images
  sit near a decision boundary. A component is removed when its z exceeds the critical value that
  keeps the chance of any false alarm, over all tested components and filters, at alpha: the
  1 - alpha quantile of the largest z in draws of clean components from that fitted overdispersed
  binomial, each draw estimated as the data were. Flagged components leave the clean estimate,
  which is made again until no more are flagged. Calibrated by those draws, not by Bonferroni's
  normal quantile: with thirty components the estimated spread is itself uncertain, and taking it
  as known flagged a fifth of simulated clean families at alpha 1 %. The price is power where the
  clean spread is wide (Fashion-MNIST under a 3x3 median). The estimate breaks down once about a
  fifth of the components are poisoned (eight strong poison components among 32 clean hide each
  other), and needs ten or so components to stand on: on a two-class dataset it is weak.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ci_jax import cache, faults, perturbations, plots
from ci_jax.defenses import gmm, gmm_jax
from ci_jax.defenses.base import Defense, Result, View, timed
from ci_jax.errors import UserError, one_line
from ci_jax.settings import section, setting

RULES: tuple[str, ...] = ("threshold", "top1", "test")
# p = 0 would make -log p infinite; clamping p keeps the score finite and still the largest.
P_FLOOR = 1e-12
MAX_IMPURITY = -math.log(P_FLOOR)


@section
class Settings:
    filters: tuple[str, ...] = setting(
        ("median3",), "perturbations whose effect on decisions measures impurity (the authors': mean2); several "
        "make a bank, each its own cached pass; NAME@S is NAME at strength S (a severity ladder: quant@2 quant@4)",
        choices=perturbations.ENTRIES)
    gaussian_sigma: float = perturbations.field("gaussian", "sigma")
    noise_width: float = perturbations.field("noise", "width")
    quant_levels: int = perturbations.field("quant", "levels")
    rule: str = setting("threshold", "which components to remove: impurity above tau (the authors'), "
                        "the single most impure one (top1), or a calibrated binomial test", choices=RULES)
    tau: float = setting(0.5, "threshold rule: remove components whose impurity exceeds tau", low=0.0)
    alpha: float = setting(0.01, "test rule: the chance of any false alarm over all components and filters",
                           low=0.0, high=1.0, low_open=True)
    bic_search: str = setting("ascent", "BIC search over k = 1, 2, ...: every k up to k_max (sweep), or "
                              "stop once BIC failed to improve twice (ascent, the authors')",
                              choices=gmm.BIC_SEARCHES)
    k_max: int = setting(10, "largest number of mixture components per class", low=1, high=1000)
    covariance: str = setting("full", "mixture covariance type (scikit-learn's)", choices=gmm.COVARIANCES)
    reg_covar: float = setting(1e-3, "added to the mixture covariances' diagonal", low=0.0, low_open=True)
    gmm_backend: str = setting("sklearn", "who fits the mixtures: scikit-learn on the host (the reference), or "
                               "EM in JAX on the device, every class at once (full covariances)",
                               choices=("sklearn", "jax"))

    def check(self) -> None:
        if self.gmm_backend == "jax" and self.covariance != "full":
            raise UserError(f"defense.ci.gmm_backend jax fits full covariances only, not {self.covariance}: "
                            "use --defense.ci.gmm_backend sklearn")
        first: dict[str, str] = {}
        for entry in self.filters:
            p, s = perturbations.resolve(entry, self, "defense.ci.filters entry ")
            name = p.describe(s)
            if name in first:
                raise UserError(f"defense.ci.filters: {one_line(repr(first[name]), 60)} and {one_line(repr(entry), 60)} "
                                f"are the same pass, {one_line(name, 80)}")
            first[name] = entry

    def passes(self, seed: int) -> list[perturbations.Applied]:
        """The bank: each entry of `filters` at its settings, in order."""
        return [perturbations.make(entry, self, seed) for entry in self.filters]


# -- impurity -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=3)
def impurity(pred_N: jax.Array, pred_filt_FN: jax.Array, comp_N: jax.Array,
             n_comp: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(impurity_FK, flips_FK, size_K): per filter and component, -log of the share of unchanged
    decisions, and the number of changed ones."""
    size_K = jax.ops.segment_sum(jnp.ones(pred_N.shape, jnp.float32), comp_N, n_comp)

    def one(pred_filt_N: jax.Array) -> tuple[jax.Array, jax.Array]:
        same_K = jax.ops.segment_sum((pred_N == pred_filt_N).astype(jnp.float32), comp_N, n_comp)
        p_K = jnp.where(size_K > 0, same_K / jnp.maximum(size_K, 1.0), 1.0)
        # -log p >= 0; abs turns -log(1) = -0.0 into 0.0 for the report.
        return jnp.abs(jnp.log(jnp.maximum(p_K, P_FLOOR))), size_K - same_K

    imp_FK, flips_FK = jax.vmap(one)(pred_filt_FN)
    return imp_FK, flips_FK, size_K


# Draws of the fitted null that calibrate the test rule; its 1 - alpha quantile of the largest z
# rests on draws * alpha of them (20 at alpha 0.01).
NULL_DRAWS = 2000
# The test rule re-estimates the clean components without those it flagged, at most this often.
TRIM_ROUNDS = 10


def _anscombe(flips: np.ndarray, n: np.ndarray) -> np.ndarray:
    """asin(sqrt(share)), Anscombe's variance-stabilised flip share: variance 1 / (4 n + 2)."""
    return np.arcsin(np.sqrt((flips + 3 / 8) / (n + 3 / 4)))


# The clean spread leaves out the components above this quantile of the reference, and those
# more than FENCE quartile-spreads above the median: poison components not yet flagged must not
# widen it (the rounds of the test take out more).
SPREAD_TOP = 0.1
FENCE = 4.0
# For a normal, the mean deviation above the median of the values between the median and the
# 1 - SPREAD_TOP quantile, in sd.
_SPREAD_MEAN = float((stats.norm.pdf(0) - stats.norm.pdf(stats.norm.isf(SPREAD_TOP)))
                     / (0.5 - SPREAD_TOP))


def _clean_fit(a_FK: np.ndarray, noise_K: np.ndarray, ref_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, between-component variance) per filter (the last axis but one of a_..FK), from the
    `ref_K` components: the median, and the mean deviation above it of the components between the
    median and the 1 - SPREAD_TOP quantile and within FENCE quartile-spreads (1.4826 (Q3 - median))
    of it, scaled to a normal's sd. No fence when the quartile-spread is within binomial noise. From the upper side only: clean
    shares pile up near 0 and trail off to the right, the side tested. A mean over that band, not
    one quantile: most clean components of MNIST flip nothing under a mild filter, and a quartile
    that falls among them puts the spread at 0 in some draws, which the critical value must then
    cover. The binomial noise is taken out."""
    a = a_FK[..., ref_K]
    centre = np.median(a, axis=-1, keepdims=True)
    dev = a - centre
    noise = float(np.median(noise_K[ref_K]))
    quartile = 1.4826 * (np.quantile(a, 0.75, axis=-1, keepdims=True) - centre)
    fence = np.where(quartile > np.sqrt(noise), FENCE * quartile, np.inf)
    band = (dev > 0) & (a <= np.quantile(a, 1.0 - SPREAD_TOP, axis=-1, keepdims=True)) & (dev <= fence)
    mean_dev = np.sum(np.where(band, dev, 0.0), axis=-1) / np.maximum(1, band.sum(-1))
    spread2 = (mean_dev / _SPREAD_MEAN) ** 2
    return centre[..., 0], np.maximum(0.0, spread2 - noise)


def _draw_clean(rng: np.random.Generator, centre: np.ndarray, between2: np.ndarray,
                n_K: np.ndarray) -> np.ndarray:
    """Arcsine flip shares of clean components: each component's true share normal about the
    centre on the arcsine scale (sd sqrt(between2)), its flips binomial. centre, between2: (..., F)."""
    a = centre[..., None] + rng.standard_normal((*centre.shape, len(n_K))) * np.sqrt(between2)[..., None]
    return _anscombe(rng.binomial(n_K.astype(np.int64), np.sin(np.clip(a, 0.0, np.pi / 2)) ** 2), n_K)


def _null_critical(centre_F: np.ndarray, between2_F: np.ndarray, n_K: np.ndarray, tested_K: np.ndarray,
                   alpha: float, seed: int) -> float:
    """The 1 - alpha quantile of the largest z over the tested components and every filter when every
    component is clean. Each draw is a family of clean components, estimated as the data were; the
    family is drawn at a spread that is itself drawn, as the estimate of the fitted spread scatters
    (a first family drawn from the fit, estimated): with thirty components the fitted spread is
    uncertain, and a critical value that took it as exact (Bonferroni's normal quantile) flagged a
    fifth of simulated clean families at alpha 1 %."""
    rng = np.random.default_rng(seed)
    noise_K = 1.0 / (4 * n_K + 2)
    every = np.ones(len(n_K), bool)
    shape = (NULL_DRAWS, len(centre_F))
    centre, between2 = _clean_fit(_draw_clean(rng, np.broadcast_to(centre_F, shape), np.broadcast_to(between2_F, shape),
                                              n_K), noise_K, every)
    a = _draw_clean(rng, centre, between2, n_K)
    centre, between2 = _clean_fit(a, noise_K, every)
    z = (a - centre[..., None]) / np.sqrt(between2[..., None] + noise_K)
    return float(np.quantile(z[..., tested_K].max(axis=(1, 2)), 1.0 - alpha))


def flip_test(flips_FK: np.ndarray, size_K: np.ndarray, eligible_K: np.ndarray,
              alpha: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """The `test` rule: (z_FK, flagged_K, per-filter clean estimates). See the module docstring.

    Only `eligible_K` components (those of classes the mixture split) are tested; the clean
    location and spread come from every non-empty component not yet flagged, re-estimated without
    the flagged ones until no more are (a poison component must not widen the clean spread that
    hides another). The critical z keeps the chance that any clean component of any filter is
    flagged at alpha (`_null_critical`, drawn with `seed`).
    """
    used = size_K > 0
    n_K = np.maximum(size_K, 1.0)
    a_FK = _anscombe(flips_FK, n_K)
    noise_K = 1.0 / (4 * n_K + 2)
    tested_K = eligible_K & used
    flagged_K = np.zeros(len(size_K), bool)
    z_FK = np.zeros_like(a_FK)
    centre_F = between2_F = np.zeros(a_FK.shape[0])
    z_crit = math.inf
    for _ in range(TRIM_ROUNDS):
        ref_K = used & ~flagged_K
        if not ref_K.any():
            break
        centre_F, between2_F = _clean_fit(a_FK, noise_K, ref_K)
        z_FK = (a_FK - centre_F[:, None]) / np.sqrt(between2_F[:, None] + noise_K)
        z_crit = _null_critical(centre_F, between2_F, n_K[used], tested_K[used], alpha, seed) \
            if tested_K.any() else math.inf
        now = (z_FK > z_crit).any(0) & tested_K
        if not (now & ~flagged_K).any():
            break
        flagged_K |= now  # once flagged, out of the clean estimate for good: the rounds cannot cycle
    estimates = [{"clean_flip_rate": float(np.sin(c) ** 2), "overdispersion_sd": math.sqrt(b), "z_critical": z_crit}
                 for c, b in zip(centre_F, between2_F)]
    return z_FK, flagged_K, estimates


def flag(impurity_K: np.ndarray, eligible_K: np.ndarray, rule: str, tau: float) -> np.ndarray:
    """The authors' rules. threshold: every component with impurity > tau, in classes that BIC
    split (a class the mixture left whole has no candidate poison component). top1: the single
    most impure component, whatever the scores (the public notebook's rule)."""
    if rule == "top1":
        return np.arange(len(impurity_K)) == np.argmax(impurity_K)
    return (impurity_K > tau) & eligible_K


class CI(Defense):
    Settings = Settings

    def check(self, image_shape, num_classes):
        for entry in self.s.filters:
            perturbations.check(entry, self.s, image_shape, "defense.ci.")

    def search(self, seed: int) -> gmm.Search:
        return gmm.Search(self.s.bic_search, self.s.k_max, self.s.covariance, self.s.reg_covar, seed)

    def clusters(self, view: View) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The per-class mixtures, fitted once per baseline and mixture settings (gmm.json)."""
        search = self.search(view.seed)
        key = f"{view.key}/{search}/{self.s.gmm_backend}"
        fit = gmm_jax.cluster if self.s.gmm_backend == "jax" else gmm.cluster
        labels = view.classes()

        def compute() -> dict[str, Any]:
            comp_N, classes = fit(view.feats_ND, view.y_N, search)
            faults.point("gmm")
            return {"comp": comp_N.tolist(), "classes": classes}

        fits = lambda v: gmm.fits(v, view.y_N, labels)
        value = cache.json_value(view.cache_paths("gmm.json"), key, compute, fits)
        return np.asarray(value["comp"], np.int64), copy.deepcopy(value["classes"])

    def run(self, view: View) -> Result:
        (comp_N, classes), t_gmm = timed(lambda: self.clusters(view))
        bank = self.s.passes(view.seed)
        names = [a.name for a in bank]
        pred_filt_FN, t_pass = timed(lambda: np.stack([view.train_pass(a.name, a.transform, a.model) for a in bank]))
        (flagged_K, score_K, report), t_imp = timed(lambda: self.decide(view, comp_N, classes, pred_filt_FN, names))
        removed_N = flagged_K[comp_N]
        return Result(score_N=score_K[comp_N], is_clean_N=~removed_N, report=report,
                      timings_s={"gmm": t_gmm, "filtered_passes": t_pass, "impurity": t_imp})

    def decide(self, view: View, comp_N: np.ndarray, classes: list[dict[str, Any]], pred_filt_FN: np.ndarray,
                names: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(flagged_K, score_K, report) of every component from its decisions under the filters:
        the impurity and the rule, given the mixtures (comp_N, classes) already fitted."""
        n_comp = sum(c["k"] for c in classes)
        imp_FK, flips_FK, size_K = (np.asarray(a, np.float64) for a in impurity(
            jnp.asarray(view.pred_N), jnp.asarray(pred_filt_FN), jnp.asarray(comp_N), n_comp))
        eligible_K = np.concatenate([np.full(c["k"], c["k"] > 1) for c in classes])
        imp_K = imp_FK.max(0)
        extra: dict[str, Any] = {}
        z_FK = None
        if self.s.rule == "test":
            z_FK, flagged_K, estimates = flip_test(flips_FK, size_K, eligible_K, self.s.alpha, view.seed)
            score_K = z_FK.max(0)
            extra["clean_estimates"] = dict(zip(names, estimates))
        else:
            flagged_K = flag(imp_K, eligible_K, self.s.rule, self.s.tau)
            score_K = imp_K
        poisons_K = (np.bincount(comp_N, weights=view.is_poison_N, minlength=n_comp).astype(np.int64)
                     if view.is_poison_N is not None else None)
        for c in classes:
            start = c.pop("offset")
            c["components"] = [self._component(i, imp_FK, flips_FK, size_K, flagged_K, names, poisons_K, z_FK)
                               for i in range(start, start + c["k"])]
        return flagged_K, score_K, {"filters": names, "rule": self.s.rule, **extra, "classes": classes}

    @staticmethod
    def _component(i, imp_FK, flips_FK, size_K, flagged_K, names, poisons_K, z_FK) -> dict[str, Any]:
        entry = {"size": int(size_K[i]), "impurity": float(imp_FK[:, i].max()),
                 "flagged": bool(flagged_K[i])}
        if len(names) > 1:
            entry["impurity_per_filter"] = {n: float(imp_FK[f, i]) for f, n in enumerate(names)}
        entry["flips"] = {n: int(flips_FK[f, i]) for f, n in enumerate(names)}
        if z_FK is not None:
            entry["z"] = {n: float(z_FK[f, i]) for f, n in enumerate(names)}
        if poisons_K is not None:
            entry["poisons"] = int(poisons_K[i])
        return entry

    def plot(self, result: Result, plots_dir: Path) -> None:
        classes = result.report["classes"]
        plots.bic_curves(plots_dir / "bic.png", classes)
        plots.impurities(plots_dir / "impurity.png", classes,
                         tau=self.s.tau if self.s.rule == "threshold" else None, rule=self.s.rule)
