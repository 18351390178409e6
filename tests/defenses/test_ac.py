"""Activation Clustering (ci_jax.defenses.ac)."""

import numpy as np

from ci_jax.defenses import ac

from helpers import N_PLANT, PLANT_TARGET, clean_features, planted_features, run_defense

PER_CLASS = 400  # clean_features' images per class


def test_ac_on_clean_features_keeps_everything():
    feats_ND, y_N = clean_features()
    res = run_defense("ac", feats_ND, y_N)
    assert res.is_clean_N.all()
    for c in res.report["classes"]:  # 2-means halves a single blob: neither half is small
        assert not c["flagged"] and min(k["size"] for k in c["clusters"]) > 0.35 * PER_CLASS


def test_ac_report_counts_poisons_per_cluster():
    feats_ND, y_N, is_poison_N = planted_features()
    classes = run_defense("ac", feats_ND, y_N, is_poison_N).report["classes"]
    target = next(c for c in classes if c["label"] == PLANT_TARGET)
    flagged = next(k for k in target["clusters"] if k["flagged"])
    assert flagged == {"size": N_PLANT, "flagged": True, "poisons": N_PLANT}
    assert target["silhouette"] > 0.5


# -- AC and SS -------------------------------------------------------------------------------------
def test_ac_silhouette_of_a_large_class_always_sees_its_small_cluster():
    # 5,000 images and one far-away image: a plain sample of 4,000 misses it one time in five, and
    # scikit-learn then refuses a one-cluster silhouette.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (4999, 2)), [[50.0, 50.0]]])
    labels = np.r_[np.zeros(4999, np.int64), 1]
    for seed in range(10):
        assert ac.silhouette(x, labels, seed) > 0.5
    assert ac.silhouette(np.array([[0.0], [0.0], [1.0]]), np.array([0, 0, 1]), 0) is None
