"""Cluster Impurity (Xiang, Miller, Kesidis, MLSP 2019).

Per labelled class, a Gaussian mixture over the penultimate features (number of components by
BIC) splits the class into components. A backdoor's poisons form their own component, and
the model decides them by the trigger, not by the content: a mild blur that destroys a small
trigger flips their decisions, while clean images keep theirs. A component's impurity is
KL([1, 0] || [p, 1 - p]) = -log p, p the fraction of its images whose decision survives the blur.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from ci_jax import faults, files, models
from ci_jax.config import Config, fingerprint
from ci_jax.defenses import Result

# p = 0 would make -log p infinite; clamping p keeps the score finite and still the largest.
P_FLOOR = 1e-12
MAX_IMPURITY = -math.log(P_FLOOR)


# -- filters ------------------------------------------------------------------------------------
def _depthwise(x_BHWC: jax.Array, k_HW: jax.Array, padding) -> jax.Array:
    # As taps, not a grouped convolution: XLA:CPU took 1.8 ms for a 2x2 mean of 64 MNIST images
    # that way, a tenth of the whole features pass of the batch.
    return models.tap_conv(x_BHWC, k_HW[:, :, None, None].astype(x_BHWC.dtype), padding)


def _median3(x_BHWC: jax.Array) -> jax.Array:
    h, w = x_BHWC.shape[1:3]
    xp = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    t = [xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]
    # Median of 9 by a min/max exchange network (Paeth / Devillard, 19 exchanges): elementwise ops
    # that XLA fuses into one loop, several times faster than sorting the 9 taps.
    for a, b in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
                 (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)):
        t[a], t[b] = jnp.minimum(t[a], t[b]), jnp.maximum(t[a], t[b])
    return t[4]


def _gaussian_kernel(sigma: float) -> jax.Array:
    r = max(1, int(math.ceil(2 * sigma)))
    t = np.arange(-r, r + 1)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    k = np.outer(g, g)
    return jnp.asarray(k / k.sum(), jnp.float32)


def make_filter(name: str, param: float = 0.0, seed: int = 0) -> Callable[[jax.Array], jax.Array]:
    """The image transform whose effect on decisions measures impurity; same output size."""
    if name == "mean2":  # the authors' filter: 2x2 mean, zero pad bottom/right
        return functools.partial(_depthwise, k_HW=jnp.full((2, 2), 0.25), padding=((0, 1), (0, 1)))
    if name == "mean3":
        return functools.partial(_depthwise, k_HW=jnp.full((3, 3), 1 / 9), padding=((1, 1), (1, 1)))
    if name == "median3":
        return _median3
    if name == "gaussian":
        k = _gaussian_kernel(param or 1.0)
        r = k.shape[0] // 2
        return functools.partial(_depthwise, k_HW=k, padding=((r, r), (r, r)))
    if name == "noise":
        half_width = param or 0.1
        key = jax.random.key(seed)

        def noise_one(x_HWC: jax.Array) -> jax.Array:
            # Keyed by the image's own content: reproducible, independent of how images are
            # batched, and with no reduction across the devices that hold a batch.
            k = jax.random.fold_in(key, jax.lax.bitcast_convert_type(jnp.sum(x_HWC), jnp.uint32))
            return x_HWC + jax.random.uniform(k, x_HWC.shape, x_HWC.dtype, -half_width, half_width)
        return jax.vmap(noise_one)
    raise ValueError(f"unknown filter {name!r}")  # config.validate names the choices earlier


# -- clustering ---------------------------------------------------------------------------------
def _fit(feats_ND: np.ndarray, k: int, cfg: Config) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(k, covariance_type=cfg.covariance, reg_covar=cfg.reg_covar,
                               random_state=cfg.seed).fit(feats_ND)


def choose_k(feats_ND: np.ndarray, cfg: Config) -> tuple[GaussianMixture | None, list[float], str | None]:
    """Fits mixtures of 1, 2, ... components and keeps the one with the lowest BIC.

    `sweep` tries every k up to k_max; `ascent` (the authors' code) stops once BIC has failed to
    improve twice in a row. k never exceeds the number of distinct feature vectors, and a k whose
    fit fails (a covariance that cannot be factorised, e.g. features of a huge scale) ends the
    search with the best k so far. Returns (mixture, BIC per k tried, note); the note says why
    the search was cut short, and a mixture of None means "one component" (too few points,
    identical or non-finite features, or no k could be fitted).
    """
    n = len(feats_ND)
    if n < 2:
        return None, [], f"{n} image(s): too few to fit a mixture, kept as one component"
    if not np.isfinite(feats_ND).all():
        return None, [], "features contain NaN or inf: kept as one component"
    n_distinct = len(np.unique(feats_ND, axis=0))
    if n_distinct < 2:
        return None, [], f"all {n} images have identical features: kept as one component"
    notes = []
    k_cap = min(cfg.k_max, n_distinct)
    if k_cap < cfg.k_max:
        notes.append(f"only {n_distinct} distinct feature vectors: k capped at {k_cap}")
    best, best_bic, bics, fails, cut_short = None, math.inf, [], 0, False
    for k in range(1, k_cap + 1):
        try:
            gmm = _fit(feats_ND, k, cfg)
            bic = float(gmm.bic(feats_ND))
        except (ValueError, np.linalg.LinAlgError) as e:  # sklearn: "ill-defined empirical covariance"
            first_sentence = " ".join(str(e).split()).split(". ")[0][:150] or type(e).__name__
            notes.append(f"k={k} could not be fitted ({first_sentence})")
            cut_short = True
            break
        if not math.isfinite(bic):  # kept out of `bics`: the report is strict JSON
            notes.append(f"k={k} gave a non-finite BIC")
            cut_short = True
            break
        bics.append(bic)
        if bic < best_bic:
            best, best_bic, fails = gmm, bic, 0
        else:
            fails += 1
            if cfg.bic_search == "ascent" and fails == 2:
                break
    if best is None:
        notes.append("kept as one component")
    elif cut_short:
        notes.append(f"kept the best smaller fit, k={best.n_components}")
    return best, bics, "; ".join(notes) or None


def cluster(feats_ND: np.ndarray, y_N: np.ndarray, num_classes: int,
            cfg: Config) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Global component id of every sample, and per class its BIC values and chosen k.

    Classes are independent, so their fits run in parallel processes on the host. A class whose
    fit was cut short or fell back to one component carries a "note" saying why.
    """
    labels = [c for c in range(num_classes) if np.any(y_N == c)]
    results = Parallel(n_jobs=-1, prefer="processes")(
        delayed(choose_k)(feats_ND[y_N == c].astype(np.float64), cfg) for c in labels)
    comp_N = np.full(len(y_N), -1, np.int64)
    classes, offset = [], 0
    for c, (gmm, bics, note) in zip(labels, results):
        idx = np.flatnonzero(y_N == c)
        k = gmm.n_components if gmm is not None else 1
        comp_N[idx] = offset + (gmm.predict(feats_ND[idx].astype(np.float64)) if gmm is not None else 0)
        entry = {"label": c, "k": k, "bic": bics, "offset": offset}
        if note:
            entry["note"] = note
        classes.append(entry)
        offset += k
    return comp_N, classes


GMM_FIELDS: tuple[str, ...] = ("bic_search", "k_max", "covariance", "reg_covar", "seed")


def cluster_cached(feats_ND: np.ndarray, y_N: np.ndarray, num_classes: int, cfg: Config,
                   cache: Path | None, feats_key: str = "") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`cluster`, kept in a JSON file keyed by the GMM settings and `feats_key` (what produced the
    features): the slow host stage runs once however many impurity settings reuse it."""
    key = f"{feats_key}-{fingerprint(cfg, GMM_FIELDS)}"
    if cache is not None and cache.exists():
        try:
            saved = files.read_json(cache)
            if saved["key"] == key and len(saved["comp"]) == len(y_N):
                return np.asarray(saved["comp"], np.int64), saved["classes"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: fitted again and rewritten below
    comp_N, classes = cluster(feats_ND, y_N, num_classes, cfg)
    faults.point("gmm")
    if cache is not None:
        files.write_json(cache, {"key": key, "classes": classes, "comp": comp_N.tolist()})
    return comp_N, classes


# -- impurity and decision ----------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=3)
def impurity(pred_N: jax.Array, pred_blur_N: jax.Array, comp_N: jax.Array,
             n_comp: int) -> tuple[jax.Array, jax.Array]:
    """(impurity_K, size_K): -log of the fraction of each component's unchanged decisions."""
    same_N = (pred_N == pred_blur_N).astype(jnp.float32)
    size_K = jax.ops.segment_sum(jnp.ones_like(same_N), comp_N, n_comp)
    same_K = jax.ops.segment_sum(same_N, comp_N, n_comp)
    p_K = jnp.where(size_K > 0, same_K / jnp.maximum(size_K, 1.0), 1.0)
    # -log p >= 0; abs turns -log(1) = -0.0 into 0.0 for the report.
    return jnp.abs(jnp.log(jnp.maximum(p_K, P_FLOOR))), size_K


def flag(impurity_K: np.ndarray, k_of_comp: np.ndarray, rule: str, tau: float) -> np.ndarray:
    """Which components to remove.

    threshold: every component with impurity > tau, in classes that BIC split (k > 1): a class
    the mixture left whole has no candidate poison component (the authors' rule).
    top1: the single most impure component, whatever the scores (the public notebook's rule).
    """
    if rule == "top1":
        return np.arange(len(impurity_K)) == np.argmax(impurity_K)
    return (impurity_K > tau) & (k_of_comp > 1)


def run(feats_ND: np.ndarray, pred_N: np.ndarray, pred_blur_N: np.ndarray, y_N: np.ndarray,
        num_classes: int, cfg: Config, is_poison_N: np.ndarray | None = None,
        cache: Path | None = None, feats_key: str = "") -> Result:
    """The defense from features and decisions already computed (clean and filtered images).

    cache, feats_key: where to keep the clustering, and what identifies the features
    (see `cluster_cached`).
    """
    t0 = time.perf_counter()
    comp_N, classes = cluster_cached(feats_ND, y_N, num_classes, cfg, cache, feats_key)
    classes = copy.deepcopy(classes)
    t_gmm = time.perf_counter() - t0
    n_comp = sum(c["k"] for c in classes)
    imp_K, size_K = impurity(jnp.asarray(pred_N), jnp.asarray(pred_blur_N), jnp.asarray(comp_N), n_comp)
    imp_K, size_K = np.asarray(imp_K, np.float64), np.asarray(size_K).astype(np.int64)
    k_of_comp = np.concatenate([np.full(c["k"], c["k"]) for c in classes])
    flagged_K = flag(imp_K, k_of_comp, cfg.rule, cfg.tau)
    poisons_K = (np.bincount(comp_N, weights=is_poison_N.astype(np.int64), minlength=n_comp).astype(np.int64)
                 if is_poison_N is not None else None)
    for c in classes:
        start = c.pop("offset")
        c["components"] = [
            {"size": int(size_K[i]), "impurity": float(imp_K[i]), "flagged": bool(flagged_K[i]),
             **({"poisons": int(poisons_K[i])} if poisons_K is not None else {})}
            for i in range(start, start + c["k"])]
    removed_N = flagged_K[comp_N]
    report = {"method": "ci", "removed": int(removed_N.sum()), "classes": classes}
    return Result(score_N=imp_K[comp_N], is_clean_N=~removed_N, report=report,
                  timings_s={"gmm": t_gmm, "impurity": time.perf_counter() - t0 - t_gmm})

