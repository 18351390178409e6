"""Per-class Gaussian mixtures with the number of components chosen by BIC (scikit-learn, on the
host), as the CI defense clusters a class's penultimate features.

No JAX here: the per-class searches run in spawned worker processes (`parallel.map_processes`),
which import this module.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from ci_jax import parallel
from ci_jax.errors import one_line

BIC_SEARCHES: tuple[str, ...] = ("sweep", "ascent")
COVARIANCES: tuple[str, ...] = ("full", "tied", "diag", "spherical")


@dataclasses.dataclass(frozen=True)
class Search:
    bic_search: str  # sweep: every k up to k_max; ascent: stop once BIC failed to improve twice
    k_max: int
    covariance: str
    reg_covar: float
    seed: int


def _fit(feats_ND: np.ndarray, k: int, s: Search) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(k, covariance_type=s.covariance, reg_covar=s.reg_covar,
                               random_state=s.seed).fit(feats_ND)


def choose_k(feats_ND: np.ndarray, s: Search) -> tuple[GaussianMixture | None, list[float], str | None]:
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
    k_cap = min(s.k_max, n_distinct)
    if k_cap < s.k_max:
        notes.append(f"only {n_distinct} distinct feature vectors: k capped at {k_cap}")
    best, best_bic, bics, fails, cut_short = None, math.inf, [], 0, False
    for k in range(1, k_cap + 1):
        try:
            gmm = _fit(feats_ND, k, s)
            bic = float(gmm.bic(feats_ND))
        except (ValueError, np.linalg.LinAlgError) as e:  # sklearn: "ill-defined empirical covariance"
            notes.append(f"k={k} could not be fitted ({one_line(str(e).split('. ')[0], 150)})")
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
            if s.bic_search == "ascent" and fails == 2:
                break
    if best is None:
        notes.append("kept as one component")
    elif cut_short:
        notes.append(f"kept the best smaller fit, k={best.n_components}")
    return best, bics, "; ".join(notes) or None


def _class_components(feats_ND: np.ndarray, s: Search) -> tuple[np.ndarray, int, list[float], str | None]:
    gmm, bics, note = choose_k(feats_ND, s)
    comp_n = gmm.predict(feats_ND) if gmm is not None else np.zeros(len(feats_ND), np.int64)
    return comp_n.astype(np.int64), (gmm.n_components if gmm is not None else 1), bics, note


def cluster(feats_ND: np.ndarray, y_N: np.ndarray, s: Search) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Global component id of every sample, and per class its BIC values, chosen k and the offset
    of its first component. Classes are independent: their searches run in parallel processes.
    A class whose fit was cut short or fell back to one component carries a "note" saying why."""
    labels = [int(c) for c in np.unique(y_N)]
    results = parallel.map_processes(_class_components, [(feats_ND[y_N == c].astype(np.float64), s)
                                                         for c in labels], desc="mixtures", rows=len(y_N))
    comp_N = np.full(len(y_N), -1, np.int64)
    classes, offset = [], 0
    for c, (comp_n, k, bics, note) in zip(labels, results):
        comp_N[y_N == c] = offset + comp_n
        classes.append({"label": c, "k": k, "bic": bics, "offset": offset, **({"note": note} if note else {})})
        offset += k
    return comp_N, classes


def fits(value: Any, y_N: np.ndarray, labels: list[int]) -> bool:
    """Whether a cached clustering fits this training set: its classes, and every image in a
    component of its own class."""
    classes = value["classes"]
    comp_N = np.asarray(value["comp"])
    if comp_N.shape != y_N.shape or comp_N.dtype.kind != "i" or [c["label"] for c in classes] != labels:
        return False
    offset = 0
    for c in classes:
        k = c["k"]
        if not isinstance(k, int) or k < 1 or c["offset"] != offset:
            return False
        mine = comp_N[y_N == c["label"]]
        if mine.size and (mine.min() < offset or mine.max() >= offset + k):
            return False
        offset += k
    return True
