"""Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava,
"Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", 2018).

Per labelled class: reduce the penultimate features to a few dimensions (PCA or FastICA), split
them with 2-means, and call the smaller cluster poison when it is small enough (`size` rule) or,
for the `silhouette` rule, when in addition the split is a real one (mean silhouette above a
threshold), as ART's silhouette analysis does.

Assumptions: a class's poisons form one of two clusters, and a smaller one. Every class is split,
so a clean class whose 2-means split happens to be lopsided loses its smaller part.

References, each a named variant (ci_jax/defenses/variants.py):
- ac/size: PCA to 10 and the `size` rule (smaller cluster under 35 % of its class): ART's
  ActivationDefence (Trusted-AI/adversarial-robustness-toolbox,
  art/defences/detector/poison/activation_defence.py), whose default reduction is PCA
  (`self.reduce = "PCA"`, since 2020; only the module function reduce_dimensionality still defaults
  to FastICA), with its "relative-size" analysis (clustering_analyzer.py, size_threshold 0.35);
  backdoor-toolbox does the same (cleansers_tool_box/activation_clustering.py: the top 10 singular
  directions of the centred features, 2-means, smaller cluster < 0.35).
- ac/silhouette: PCA to 10, and the smaller cluster only when the split's silhouette exceeds 0.1
  too: ART's "silhouette-scores" analysis (analyze_by_silhouette_score).
- ac/ica: FastICA to 10 and the `size` rule: the paper's reduction, as BackdoorBench runs it
  (detection_pretrain/ac.py: FastICA(nb_dims=10, whiten="unit-variance"), smaller < 0.35).

Deviations: the `size` rule is ART's "relative-size" analysis, not ART's default "smaller" (which
flags the smaller cluster of every class, as BackdoorBench's config/detection/ac/*.yaml names but
its code does not do); the paper's exclusionary reclassification (retrain without a cluster and see
where its images go) is not implemented.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from ci_jax import parallel
from ci_jax.defenses.base import Defense, Result, View, timed
from ci_jax.settings import section, setting

SILHOUETTE_SAMPLE = 4000  # silhouette is O(n^2); a seeded sample of a class is plenty


@section
class Settings:
    reduce: str = setting("pca", "dimensionality reduction before 2-means", choices=("pca", "ica"))
    dims: int = setting(10, "dimensions kept by the reduction", low=1, high=10_000)
    rule: str = setting("size", "size: flag the smaller cluster when it is small; silhouette: and when "
                        "the split scores well", choices=("size", "silhouette"))
    size: float = setting(0.35, "flag the smaller cluster when it holds less than this share of its class",
                          low=0.0, high=1.0, low_open=True)
    silhouette: float = setting(0.1, "silhouette rule: flag only when the split's silhouette exceeds this",
                                low=-1.0, high=1.0)


def split(feats_ND: np.ndarray, s: Settings, seed: int) -> tuple[np.ndarray, float | None]:
    """2-means cluster (0/1) of each sample after the reduction, and the split's silhouette."""
    n, d = feats_ND.shape
    if n < 2 or not np.any(feats_ND != feats_ND[:1]):  # nothing to split
        return np.zeros(n, np.int64), None
    dims = min(s.dims, n, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if s.reduce == "ica":
            reduced = FastICA(dims, whiten="unit-variance", random_state=seed, max_iter=500).fit_transform(feats_ND)
        else:
            reduced = PCA(dims, random_state=seed).fit_transform(feats_ND)
        labels_N = KMeans(2, n_init=10, random_state=seed).fit_predict(reduced).astype(np.int64)
    if len(np.unique(labels_N)) < 2:
        return np.zeros(n, np.int64), None
    return labels_N, silhouette(reduced, labels_N, seed)  # reported under either rule


def silhouette(reduced_ND: np.ndarray, labels_N: np.ndarray, seed: int) -> float | None:
    """The split's mean silhouette, on a seeded sample of a large class that always holds the
    smaller cluster's images too; None where it is undefined (fewer than 3 distinct points)."""
    n = len(labels_N)
    idx = np.arange(n)
    if n > SILHOUETTE_SAMPLE:
        idx = np.random.default_rng(seed).choice(n, SILHOUETTE_SAMPLE, replace=False)
        small = np.flatnonzero(labels_N == np.argmin(np.bincount(labels_N, minlength=2)))
        idx = np.union1d(idx, small[:SILHOUETTE_SAMPLE // 2])
    x, lab = reduced_ND[idx], labels_N[idx]
    if len(np.unique(lab)) < 2 or len(np.unique(x, axis=0)) < 3:
        return None
    return float(silhouette_score(x, lab))


class AC(Defense):
    Settings = Settings

    def run(self, view: View) -> Result:
        labels = view.classes()
        splits, seconds = timed(lambda: parallel.map_processes(
            split, [(view.feats_ND[view.y_N == c].astype(np.float64), self.s, view.seed) for c in labels], desc="ac clusters",
            rows=len(view.y_N)))
        score_N = np.zeros(len(view.y_N))
        removed_N = np.zeros(len(view.y_N), bool)
        classes: list[dict[str, Any]] = []
        for c, (cluster_N, sil) in zip(labels, splits):
            idx = np.flatnonzero(view.y_N == c)
            size_2 = np.bincount(cluster_N, minlength=2)
            share_2 = size_2 / len(idx)
            small = int(np.argmin(size_2))
            flagged = bool(size_2[small] > 0 and share_2[small] < self.s.size)
            if self.s.rule == "silhouette":
                flagged = flagged and sil is not None and sil > self.s.silhouette
            # The smaller a sample's cluster, the more suspicious: a score comparable across classes.
            score_N[idx] = 1.0 - share_2[cluster_N]
            if flagged:
                removed_N[idx[cluster_N == small]] = True
            classes.append({"label": c, "silhouette": sil, "flagged": flagged,
                            "clusters": [{"size": int(size_2[j]), "flagged": flagged and j == small,
                                          **view.poisons_in(idx[cluster_N == j])} for j in range(2)]})
        return Result(score_N=score_N, is_clean_N=~removed_N, report={"classes": classes},
                      timings_s={"clustering": seconds})
