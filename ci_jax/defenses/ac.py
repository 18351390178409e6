"""Activation Clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", 2018).

Per labelled class: reduce the penultimate features to a few dimensions (PCA or FastICA), split
them with 2-means, and call the smaller cluster poison when it is small enough (`size` rule) or,
for the `silhouette` rule, when in addition the split is a real one (mean silhouette above a
threshold), as ART's silhouette analysis does.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from ci_jax.config import Config
from ci_jax.defenses import Result, poisons_in

SILHOUETTE_SAMPLE = 4000  # silhouette is O(n^2); a seeded sample of a class is plenty


def split(feats_ND: np.ndarray, cfg: Config) -> tuple[np.ndarray, float | None]:
    """2-means cluster (0/1) of each sample after the reduction, and the split's silhouette."""
    n, d = feats_ND.shape
    if n < 2 or not np.any(feats_ND != feats_ND[:1]):  # nothing to split
        return np.zeros(n, np.int64), None
    dims = min(cfg.ac_dims, n, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if cfg.ac_reduce == "ica":
            reduced = FastICA(dims, whiten="unit-variance", random_state=cfg.seed,
                              max_iter=500).fit_transform(feats_ND)
        else:
            reduced = PCA(dims, random_state=cfg.seed).fit_transform(feats_ND)
        labels_N = KMeans(2, n_init=10, random_state=cfg.seed).fit_predict(reduced).astype(np.int64)
    if len(np.unique(labels_N)) < 2:
        return np.zeros(n, np.int64), None
    sil = float(silhouette_score(reduced, labels_N, sample_size=min(n, SILHOUETTE_SAMPLE),
                                 random_state=cfg.seed))
    return labels_N, sil


def run(feats_ND: np.ndarray, y_N: np.ndarray, num_classes: int, cfg: Config,
        is_poison_N: np.ndarray | None = None) -> Result:
    t0 = time.perf_counter()
    labels = [c for c in range(num_classes) if np.any(y_N == c)]
    splits = Parallel(n_jobs=-1, prefer="processes")(
        delayed(split)(feats_ND[y_N == c].astype(np.float64), cfg) for c in labels)
    score_N = np.zeros(len(y_N))
    removed_N = np.zeros(len(y_N), bool)
    classes: list[dict[str, Any]] = []
    for c, (cluster_N, sil) in zip(labels, splits):
        idx = np.flatnonzero(y_N == c)
        size_2 = np.bincount(cluster_N, minlength=2)
        share_2 = size_2 / len(idx)
        small = int(np.argmin(size_2))
        flagged = bool(size_2[small] > 0 and share_2[small] < cfg.ac_size)
        if cfg.ac_rule == "silhouette":
            flagged = flagged and sil is not None and sil > cfg.ac_silhouette
        # The smaller a sample's cluster, the more suspicious: a score comparable across classes.
        score_N[idx] = 1.0 - share_2[cluster_N]
        if flagged:
            removed_N[idx[cluster_N == small]] = True
        classes.append({
            "label": c, "silhouette": sil, "flagged": flagged,
            "clusters": [{"size": int(size_2[j]), "flagged": flagged and j == small,
                          **poisons_in(is_poison_N, idx[cluster_N == j])} for j in range(2)]})
    report = {"method": "ac", "removed": int(removed_N.sum()), "classes": classes}
    return Result(score_N=score_N, is_clean_N=~removed_N, report=report,
                  timings_s={"defense": time.perf_counter() - t0})
