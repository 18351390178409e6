"""Per-class Gaussian mixtures with k chosen by BIC (ci_jax.defenses.gmm): the search, degenerate
classes, and the clustering of every class."""

import math

import numpy as np
import pytest

from ci_jax.defenses import ci
from ci_jax.defenses import gmm as mixtures
from ci_jax.defenses.gmm import choose_k, cluster

from helpers import defense_settings, run_ci

D = 5


def _search(seed=0, **kw) -> mixtures.Search:
    """The mixture search of CI's settings with `defense.ci.KEY = value` for each keyword."""
    return ci.CI(defense_settings("ci", **kw)).search(seed)


def _mixture(n_per: int = 300, seed: int = 0) -> np.ndarray:
    """Three well-separated 5-D unit Gaussians."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0] * D, [20.0] * D, [-20.0, 20.0, -20.0, 20.0, -20.0]])
    return np.concatenate([rng.normal(m, 1.0, (n_per, D)) for m in means])


@pytest.fixture(scope="module")
def mixture_ND():
    return _mixture()


@pytest.fixture(scope="module")
def sweep_fit(mixture_ND):
    return choose_k(mixture_ND, _search(bic_search="sweep", k_max=6))


@pytest.fixture(scope="module")
def ascent_fit(mixture_ND):
    return choose_k(mixture_ND, _search(bic_search="ascent", k_max=10))


# --- choose_k ----------------------------------------------------------------------------------
def test_sweep_picks_the_true_k_and_tries_every_k(sweep_fit):
    gmm, bics, note = sweep_fit
    assert note is None
    assert gmm.n_components == 3
    assert len(bics) == 6
    assert all(math.isfinite(b) for b in bics)
    assert int(np.argmin(bics)) + 1 == 3


def test_ascent_picks_the_true_k_and_stops_after_two_non_improvements(ascent_fit, sweep_fit):
    gmm, bics, _ = ascent_fit
    assert gmm.n_components == 3
    assert len(bics) < 10
    # k = 1, 2, 3 improve; k = 4 and 5 do not -> stop there.
    assert len(bics) == 5
    assert bics[0] > bics[1] > bics[2]
    assert bics[3] >= bics[2] and bics[4] >= bics[2]
    # The same fits as the sweep's, as far as the ascent went.
    np.testing.assert_allclose(bics, sweep_fit[1][:5])


@pytest.mark.parametrize("search", ["sweep", "ascent"])
def test_one_gaussian_gives_k_1(search):
    x_ND = np.random.default_rng(1).normal(0.0, 1.0, (150, D))
    gmm, bics, _ = choose_k(x_ND, _search(bic_search=search, k_max=3 if search == "sweep" else 10))
    assert gmm.n_components == 1
    assert int(np.argmin(bics)) == 0
    assert len(bics) == 3  # ascent: k = 2 and 3 fail to improve; sweep: k_max


@pytest.mark.parametrize("search", ["sweep", "ascent"])
def test_k_never_exceeds_the_number_of_points(search):
    x_ND = np.random.default_rng(2).normal(0.0, 1.0, (3, D))
    gmm, bics, note = choose_k(x_ND, _search(bic_search=search, k_max=10, reg_covar=1e-3))
    assert 1 <= gmm.n_components <= 3
    assert len(bics) <= 3
    assert "k capped at 3" in note


def test_single_point_class_is_one_component():
    gmm, bics, note = choose_k(np.ones((1, D)), _search(bic_search="sweep", k_max=10))
    assert gmm is None and bics == [] and "too few" in note
    feats = np.concatenate([np.random.default_rng(0).normal(size=(50, D)), np.ones((1, D))])
    y = np.array([0] * 50 + [1])
    comp, classes = cluster(feats, y, _search(bic_search="sweep", k_max=3))
    assert classes[1]["k"] == 1 and "too few" in classes[1]["note"]
    assert comp[-1] == classes[0]["k"]


def test_k_max_1_fits_one_component(mixture_ND):
    gmm, bics, _ = choose_k(mixture_ND, _search(bic_search="sweep", k_max=1))
    assert gmm.n_components == 1 and len(bics) == 1


@pytest.mark.parametrize("covariance", ["diag", "spherical", "tied"])
def test_other_covariance_types_also_find_the_mixture(mixture_ND, covariance):
    gmm, _, _ = choose_k(mixture_ND, _search(bic_search="ascent", k_max=5, covariance=covariance))
    assert gmm.covariance_type == covariance
    assert gmm.n_components == 3


def test_choose_k_is_deterministic_for_a_seed(mixture_ND):
    cfg = _search(bic_search="sweep", k_max=3, seed=3)
    g1, b1, _ = choose_k(mixture_ND, cfg)
    g2, b2, _ = choose_k(mixture_ND, cfg)
    assert b1 == b2
    np.testing.assert_array_equal(g1.predict(mixture_ND), g2.predict(mixture_ND))


# --- degenerate classes: no crash, a fallback, and a note that says what happened ----------------
def _degenerate(name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if name == "fewer_than_k":
        return rng.normal(size=(3, D))
    if name == "identical_rows":
        return np.full((40, D), 0.37)
    if name == "duplicated_rows":  # 3 distinct vectors, each many times
        return np.repeat(rng.normal(size=(3, D)) * 5, [30, 20, 10], axis=0)
    if name == "constant_feature":  # one feature identical across the class
        return np.c_[rng.normal(size=(100, D - 1)), np.full(100, 7.0)]
    if name == "huge_scale":  # real blobs, but at 1e30: reg_covar no longer keeps covariances sane
        return _mixture(n_per=30, seed=1) * 1e30
    if name == "nan":
        x = rng.normal(size=(50, D))
        x[3, 1] = np.nan
        return x
    if name == "inf":
        x = rng.normal(size=(50, D))
        x[7, 0] = np.inf
        return x
    raise KeyError(name)


DEGENERATE = ["fewer_than_k", "identical_rows", "duplicated_rows", "constant_feature", "huge_scale",
              "nan", "inf"]


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_class_does_not_crash(name, covariance):
    x_ND = _degenerate(name)
    gmm, bics, _ = choose_k(x_ND, _search(bic_search="sweep", k_max=10, covariance=covariance))
    assert all(math.isfinite(b) for b in bics)
    if gmm is not None:
        assert gmm.n_components <= len(np.unique(x_ND, axis=0))
        assert gmm.predict(x_ND).shape == (len(x_ND),)


@pytest.mark.parametrize("name, k, note", [
    ("identical_rows", None, "all 40 images have identical features"),
    ("duplicated_rows", 3, "only 3 distinct feature vectors: k capped at 3"),
    ("fewer_than_k", None, "k capped at 3"),
    ("nan", None, "NaN or inf"),
    ("inf", None, "NaN or inf"),
])
def test_degenerate_class_notes(name, k, note):
    gmm, _, got = choose_k(_degenerate(name), _search(bic_search="sweep", k_max=10))
    assert note in got
    if k is not None:
        assert gmm.n_components == k


def test_a_k_that_cannot_be_fitted_ends_the_search_with_the_best_smaller_k():
    # Full covariances of 1e30-scale blobs: some k > 1 fails in sklearn ("ill-defined empirical
    # covariance"); the search stops there and keeps the best k before it.
    gmm, bics, note = choose_k(_degenerate("huge_scale"), _search(bic_search="sweep", k_max=10))
    assert "could not be fitted" in note and "kept the best smaller fit" in note
    failed_k = int(note.split("k=")[1].split(" ")[0])
    assert len(bics) == failed_k - 1 and gmm.n_components == int(np.argmin(bics)) + 1


def test_a_class_where_even_k_1_fails_is_one_component(monkeypatch):
    def fails(feats_ND, k, search):
        raise ValueError("Fitting the mixture model failed. Try something else.")

    monkeypatch.setattr(mixtures, "_fit", fails)
    gmm, bics, note = choose_k(_mixture(n_per=20), _search(k_max=4))
    assert gmm is None and bics == []
    assert note == "k=1 could not be fitted (Fitting the mixture model failed); kept as one component"


def test_cluster_reports_degenerate_classes_and_stays_json():
    import json

    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(60, D)), _degenerate("identical_rows"), _degenerate("nan"),
              _degenerate("duplicated_rows"), _degenerate("fewer_than_k")]
    feats = np.concatenate(blocks)
    y = np.concatenate([np.full(len(b), i) for i, b in enumerate(blocks)])
    comp, classes = cluster(feats, y, _search(bic_search="ascent", k_max=10))
    assert (comp >= 0).all()
    notes = {c["label"]: c.get("note") for c in classes}
    assert "identical features" in notes[1] and "NaN" in notes[2]
    assert "k capped at 3" in notes[3] and "k capped at 3" in notes[4]
    assert classes[1]["k"] == classes[2]["k"] == 1
    json.dumps(classes, allow_nan=False)
    # The defense end to end still runs and scores every sample.
    pred = np.zeros(len(y), np.int32)
    res = run_ci(feats, pred, pred, y, 5, defense_settings("ci", bic_search="ascent", k_max=10))
    assert res.score_N.shape == y.shape and np.isfinite(res.score_N).all()
    json.dumps(res.report, allow_nan=False)


# --- cluster -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered():
    """Class 0: the 3-blob mixture; class 1 absent; class 2: one blob; class 3: two blobs."""
    rng = np.random.default_rng(5)
    x0 = _mixture(n_per=100, seed=6)
    x2 = rng.normal(0.0, 1.0, (150, D))
    x3 = np.concatenate([rng.normal(0.0, 1.0, (120, D)), rng.normal(30.0, 1.0, (40, D))])
    feats = np.concatenate([x0, x2, x3]).astype(np.float32)
    y = np.concatenate([np.zeros(len(x0)), np.full(len(x2), 2), np.full(len(x3), 3)]).astype(np.int32)
    perm = rng.permutation(len(y))  # classes interleaved, as in a real training set
    feats, y = feats[perm], y[perm]
    cfg = _search(bic_search="sweep", k_max=4)
    comp, classes = cluster(feats, y, cfg)
    return feats, y, cfg, comp, classes


def test_cluster_reports_each_present_class_with_its_k_and_bics(clustered):
    _, _, _, _, classes = clustered
    assert [c["label"] for c in classes] == [0, 2, 3]  # absent classes 1 and 4 are skipped
    assert [c["k"] for c in classes] == [3, 1, 2]
    for c in classes:
        assert len(c["bic"]) == 4
        assert c["k"] == int(np.argmin(c["bic"])) + 1


def test_cluster_ids_are_contiguous_per_class_with_consistent_offsets(clustered):
    _, y, _, comp, classes = clustered
    assert comp.shape == y.shape
    assert (comp >= 0).all()  # every sample assigned
    offset = 0
    for c in classes:
        assert c["offset"] == offset
        ids = np.unique(comp[y == c["label"]])
        # Ids of a class lie in its own block [offset, offset + k) and use all of it here.
        np.testing.assert_array_equal(ids, np.arange(offset, offset + c["k"]))
        offset += c["k"]
    assert comp.max() == offset - 1


def test_cluster_separates_the_blobs(clustered):
    feats, y, _, comp, classes = clustered
    # Class 3: the far blob (mean 30) is one component, the near blob the other.
    far = (y == 3) & (feats[:, 0] > 15)
    near = (y == 3) & (feats[:, 0] <= 15)
    assert len(np.unique(comp[far])) == 1 and len(np.unique(comp[near])) == 1
    assert np.unique(comp[far])[0] != np.unique(comp[near])[0]
    assert np.bincount(comp[y == 3]).max() == 120


def test_cluster_is_deterministic_for_a_seed(clustered):
    feats, y, cfg, comp, classes = clustered
    comp2, classes2 = cluster(feats, y, cfg)
    np.testing.assert_array_equal(comp, comp2)
    assert classes == classes2
