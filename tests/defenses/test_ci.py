"""Cluster Impurity on synthetic arrays: BIC model choice, clustering, impurity, flagging, the
calibrated test rule, and the defense end to end from precomputed features and decisions (no
training; the filters themselves are test_filters.py's)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import config, defenses
from ci_jax.config import Config
from ci_jax.defenses import ci
from ci_jax.defenses import gmm as mixtures
from ci_jax.defenses.gmm import choose_k, cluster

D = 5


def _settings(**kw) -> ci.Settings:
    """The CI settings of a validated config with `defense.ci.KEY = value` for each keyword."""
    return config.replace(Config(), {f"defense.ci.{k}": v for k, v in kw.items()}).defense.ci


def _search(seed=0, **kw) -> mixtures.Search:
    return ci.CI(_settings(**kw)).search(seed)


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
    res = _run(feats, pred, pred, y, 5, _settings(bic_search="ascent", k_max=10))
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


# --- impurity ----------------------------------------------------------------------------------


def _impurity(pred, filtered_FN, comp, n_comp):
    out = ci.impurity(jnp.asarray(pred), jnp.asarray(filtered_FN), jnp.asarray(comp), n_comp)
    return tuple(np.asarray(a, np.float64) for a in out)


def test_impurity_hand_computed():
    # Component 0 (A): 4 samples, none changed. 1 (B): 4 samples, 2 changed. 2 (C): 3 samples,
    # all changed. 3: no members.
    comp = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    pred = np.array([1, 2, 3, 4, 5, 5, 5, 5, 7, 7, 7])
    blur = np.array([1, 2, 3, 4, 5, 0, 5, 0, 1, 2, 3])
    imp_FK, flips_FK, size = _impurity(pred, blur[None], comp, 4)
    assert imp_FK.shape == flips_FK.shape == (1, 4) and size.shape == (4,)
    imp = imp_FK[0]
    np.testing.assert_array_equal(size, [4, 4, 3, 0])
    np.testing.assert_array_equal(flips_FK[0], [0, 2, 3, 0])
    assert imp[0] == 0.0
    assert imp[1] == pytest.approx(math.log(2), rel=1e-6)
    assert np.isfinite(imp).all()
    assert imp[2] == pytest.approx(ci.MAX_IMPURITY, rel=1e-6)
    assert imp[3] == 0.0  # an empty component is pure and has size 0
    assert imp[2] == imp.max()


def test_impurity_of_a_filter_bank_is_one_row_per_filter():
    comp = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    pred = np.array([1, 2, 3, 4, 5, 5, 5, 5, 7, 7, 7])
    blur = np.array([1, 2, 3, 4, 5, 0, 5, 0, 1, 2, 3])
    same = pred.copy()
    one = pred.copy()
    one[0] = 9  # one of component 0's four decisions changes
    imp_FK, flips_FK, size = _impurity(pred, np.stack([blur, same, one]), comp, 4)
    np.testing.assert_array_equal(flips_FK, [[0, 2, 3, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(imp_FK[1], 0.0)
    assert imp_FK[2, 0] == pytest.approx(-math.log(3 / 4), rel=1e-6)
    np.testing.assert_array_equal(imp_FK[0], _impurity(pred, blur[None], comp, 4)[0][0])


def test_max_impurity_is_minus_log_of_the_floor():
    assert ci.MAX_IMPURITY == pytest.approx(-math.log(ci.P_FLOOR))
    assert math.isfinite(ci.MAX_IMPURITY)


def test_impurity_is_minus_log_of_the_unchanged_fraction():
    rng = np.random.default_rng(0)
    n, k = 200, 5
    comp = rng.integers(0, k, n)
    pred = rng.integers(0, 10, n)
    blur = np.where(rng.random(n) < 0.3, rng.integers(0, 10, n), pred)
    imp_FK, flips_FK, size = _impurity(pred, blur[None], comp, k)
    for j in range(k):
        m = comp == j
        assert size[j] == m.sum()
        assert flips_FK[0, j] == np.sum(pred[m] != blur[m])
        p = np.mean(pred[m] == blur[m])
        assert imp_FK[0, j] == pytest.approx(-math.log(max(p, ci.P_FLOOR)), rel=1e-5, abs=1e-6)


def test_pure_component_impurity_is_positive_zero():
    imp, _, _ = ci.impurity(jnp.zeros(2, jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.zeros(2, jnp.int32), 2)
    assert not np.signbit(np.asarray(imp)).any()


# --- flag --------------------------------------------------------------------------------------


def test_threshold_flags_impure_components_of_split_classes_only():
    imp = np.array([0.0, 2.0, 0.7, 0.4, 5.0, 0.51])
    k_of_comp = np.array([3, 3, 3, 2, 1, 2])  # comps 0-2: a k=3 class; 3, 5: k=2; 4: a k=1 class
    flagged = ci.flag(imp, k_of_comp > 1, "threshold", 0.5)
    assert flagged.dtype == bool
    np.testing.assert_array_equal(flagged, [False, True, True, False, False, True])


def test_threshold_never_flags_a_k1_class():
    imp = np.full(3, ci.MAX_IMPURITY)
    assert not ci.flag(imp, np.zeros(3, bool), "threshold", 0.0).any()


def test_threshold_boundary_is_strict():
    imp = np.array([0.5, 0.5 + 1e-9, 0.5 - 1e-9])
    flagged = ci.flag(imp, np.ones(3, bool), "threshold", 0.5)
    np.testing.assert_array_equal(flagged, [False, True, False])


def test_threshold_tau_zero_flags_every_impure_component_of_split_classes():
    imp = np.array([0.0, 1e-6, 0.0])
    np.testing.assert_array_equal(ci.flag(imp, np.ones(3, bool), "threshold", 0.0), [False, True, False])


@pytest.mark.parametrize("imp, expected", [
    ([0.1, 3.0, 0.2, 2.9], 1),
    ([0.0, 0.0, 0.0], 0),           # all pure: still exactly one
    ([0.0, 0.0, ci.MAX_IMPURITY], 2),
    ([0.3], 0),
])
def test_top1_flags_exactly_the_argmax(imp, expected):
    imp = np.array(imp)
    eligible = np.zeros(len(imp), bool)  # top1 ignores k, even k == 1 classes
    flagged = ci.flag(imp, eligible, "top1", 100.0)
    assert flagged.sum() == 1
    assert flagged[expected]


# --- the test rule -----------------------------------------------------------------------------

# 12 components of 100 to 300 images with 0.5 % to 4 % of their decisions flipped by the filter
# (clean ones differ: overdispersed), and one of 60 with 57 flipped.
SIZES = np.array([100, 150, 200, 250, 300, 120, 180, 220, 260, 140, 160, 240, 60], float)
FLIPS = np.array([1, 3, 2, 10, 6, 4, 7, 2, 5, 1, 6, 9, 57], float)


def test_test_rule_flags_the_component_that_flips_far_more_than_clean_ones():
    eligible = np.ones(len(SIZES), bool)
    z_FK, flagged, (est,) = ci.flip_test(FLIPS[None], SIZES, eligible, alpha=0.01)
    np.testing.assert_array_equal(np.flatnonzero(flagged), [12])
    assert est["z_critical"] == pytest.approx(ci.stats.norm.isf(0.01 / 13))
    assert z_FK[0, 12] > est["z_critical"] > z_FK[0, :12].max()
    # The clean flip rate is the median component's, about 2.5 % here; the spread beyond the
    # binomial's is kept.
    assert 0.01 < est["clean_flip_rate"] < 0.04
    assert est["overdispersion_sd"] > 0


def test_test_rule_only_tests_eligible_components_and_counts_them_for_bonferroni():
    eligible = np.ones(len(SIZES), bool)
    eligible[[0, 12]] = False
    _, flagged, (est,) = ci.flip_test(FLIPS[None], SIZES, eligible, alpha=0.01)
    assert not flagged.any()
    assert est["z_critical"] == pytest.approx(ci.stats.norm.isf(0.01 / 11))
    # Two filters: twice the tests; a component is flagged when either filter flags it.
    quiet = np.minimum(FLIPS, 3)
    z_FK, flagged2, ests = ci.flip_test(np.stack([quiet, FLIPS]), SIZES, np.ones(len(SIZES), bool), alpha=0.01)
    assert z_FK.shape == (2, len(SIZES)) and len(ests) == 2
    assert ests[0]["z_critical"] == pytest.approx(ci.stats.norm.isf(0.01 / 26))
    np.testing.assert_array_equal(np.flatnonzero(flagged2), [12])


def test_test_rule_ignores_empty_components():
    sizes = np.append(SIZES, 0.0)
    flips = np.append(FLIPS, 0.0)
    _, flagged, (est,) = ci.flip_test(flips[None], sizes, np.ones(len(sizes), bool), alpha=0.01)
    assert not flagged[-1] and flagged[12]
    assert est["z_critical"] == pytest.approx(ci.stats.norm.isf(0.01 / 13))


# --- the defense from precomputed arrays -----------------------------------------------------


def _view(feats, pred, filtered, y, num_classes=3, is_poison=None, **kw) -> defenses.View:
    """A View of a baseline whose decisions are `pred`, and `filtered` through any filter (or
    filtered[name] through the filter whose pass is `name`)."""
    calls = []

    def predict(x_NHWC, transform=None, desc=None):
        assert transform is not None and len(x_NHWC) == len(y)
        calls.append(desc)
        out = filtered[desc] if isinstance(filtered, dict) else filtered
        return np.asarray(out, np.int32), np.zeros((len(y), 1), np.float32)

    view = defenses.View(x_NHWC=np.zeros((len(y), 1, 1, 1), np.float32), y_N=np.asarray(y), feats_ND=feats,
                         pred_N=np.asarray(pred), num_classes=num_classes, predict=predict, seed=0,
                         is_poison_N=is_poison, **kw)
    view.calls = calls
    return view


def _run(feats, pred, filtered, y, num_classes, settings, is_poison=None, **kw) -> defenses.Result:
    return ci.CI(settings).run(_view(feats, pred, filtered, y, num_classes, is_poison, **kw))


N_CLEAN, N_POISON = 300, 60


@pytest.fixture(scope="module")
def poisoned_arrays():
    """Classes 0 and 1: one blob each. Class 2: a clean blob of 300 and a far 'poison' blob of
    60 (shuffled in), whose filtered decisions all change; every other decision survives."""
    rng = np.random.default_rng(0)
    feats = np.concatenate([
        rng.normal(-10.0, 1.0, (N_CLEAN, D)),
        rng.normal(10.0, 1.0, (N_CLEAN, D)),
        rng.normal(0.0, 1.0, (N_CLEAN, D)),
        rng.normal([0, 40, 0, 40, 0], 1.0, (N_POISON, D)),
    ]).astype(np.float32)
    y = np.repeat([0, 1, 2, 2], [N_CLEAN, N_CLEAN, N_CLEAN, N_POISON]).astype(np.int32)
    is_poison = np.zeros(len(y), bool)
    is_poison[-N_POISON:] = True
    perm = rng.permutation(len(y))
    feats, y, is_poison = feats[perm], y[perm], is_poison[perm]
    pred = y.copy()
    pred_blur = np.where(is_poison, (y + 1) % 3, pred).astype(np.int32)  # poisons flip
    return feats, pred, pred_blur, y, is_poison


@pytest.mark.parametrize("search", ["ascent", "sweep"])
def test_run_removes_exactly_the_poison_component(poisoned_arrays, search):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    settings = _settings(rule="threshold", tau=0.5, bic_search=search, k_max=4)
    res = _run(feats, pred, pred_blur, y, 3, settings, is_poison)

    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)
    assert res.is_clean_N.dtype == bool
    assert res.report["filters"] == ["median3"] and res.report["rule"] == "threshold"
    assert int((~res.is_clean_N).sum()) == N_POISON
    assert set(res.timings_s) == {"gmm", "filtered_passes", "impurity"}

    classes = res.report["classes"]
    assert [c["label"] for c in classes] == [0, 1, 2]
    assert [c["k"] for c in classes] == [1, 1, 2]
    for c in classes:
        assert "offset" not in c
        assert len(c["components"]) == c["k"]
        assert sum(comp["size"] for comp in c["components"]) == int((y == c["label"]).sum())
        for comp in c["components"]:
            assert set(comp) == {"size", "impurity", "flagged", "flips", "poisons"}
    clean = {"size": N_CLEAN, "impurity": 0.0, "flagged": False, "flips": {"median3": 0}, "poisons": 0}
    for c in classes[:2]:
        (comp,) = c["components"]
        assert comp == clean
    by_flag = {comp["flagged"]: comp for comp in classes[2]["components"]}
    assert by_flag[True]["size"] == by_flag[True]["poisons"] == by_flag[True]["flips"]["median3"] == N_POISON
    assert by_flag[True]["impurity"] == pytest.approx(ci.MAX_IMPURITY, rel=1e-6)
    assert by_flag[False] == clean

    # score_N: each sample's component impurity.
    assert res.score_N.shape == y.shape
    np.testing.assert_allclose(res.score_N[is_poison], by_flag[True]["impurity"])
    np.testing.assert_array_equal(res.score_N[~is_poison], 0.0)


def test_run_score_equals_the_component_impurity_of_each_sample(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    # Some clean decisions of class 0 change too, so class-0 scores are not all 0 or MAX.
    rng = np.random.default_rng(9)
    pred_blur = np.where((y == 0) & (rng.random(len(y)) < 0.2), 9, pred_blur)
    settings = _settings(rule="threshold", tau=0.5, k_max=4)
    res = _run(feats, pred, pred_blur, y, 10, settings, is_poison)
    comp, _ = cluster(feats, y, ci.CI(settings).search(0))  # deterministic: the same components
    imp = np.concatenate([[x["impurity"] for x in c["components"]] for c in res.report["classes"]])
    np.testing.assert_array_equal(res.score_N, imp[comp])
    p0 = np.mean(pred[y == 0] == pred_blur[y == 0])
    assert res.report["classes"][0]["components"][0]["impurity"] == pytest.approx(-math.log(p0), rel=1e-5)
    # Class 0 was not split: impure, but not flagged under the threshold rule.
    assert not res.report["classes"][0]["components"][0]["flagged"]
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)


def test_run_without_ground_truth_has_no_poison_counts(poisoned_arrays):
    feats, pred, pred_blur, y, _ = poisoned_arrays
    res = _run(feats, pred, pred_blur, y, 3, _settings(k_max=4))
    for c in res.report["classes"]:
        for comp in c["components"]:
            assert "poisons" not in comp
    assert int((~res.is_clean_N).sum()) == N_POISON


def test_run_top1_removes_the_poison_component(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    res = _run(feats, pred, pred_blur, y, 3, _settings(rule="top1", k_max=4), is_poison)
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)


def test_run_on_clean_data_flags_nothing_under_threshold(poisoned_arrays):
    feats, pred, _, y, is_poison = poisoned_arrays
    feats, pred, y = feats[~is_poison], pred[~is_poison], y[~is_poison]
    res = _run(feats, pred, pred.copy(), y, 3, _settings(rule="threshold", tau=0.5, k_max=4),
               np.zeros(len(y), bool))
    assert res.is_clean_N.all()
    np.testing.assert_array_equal(res.score_N, 0.0)
    for c in res.report["classes"]:
        for comp in c["components"]:
            assert comp["impurity"] == 0.0 and not comp["flagged"] and comp["poisons"] == 0


def test_run_top1_on_clean_data_still_removes_one_component(poisoned_arrays):
    feats, pred, _, y, is_poison = poisoned_arrays
    feats, pred, y = feats[~is_poison], pred[~is_poison], y[~is_poison]
    res = _run(feats, pred, pred.copy(), y, 3, _settings(rule="top1", k_max=4))
    flagged = [comp for c in res.report["classes"] for comp in c["components"] if comp["flagged"]]
    assert len(flagged) == 1
    assert int((~res.is_clean_N).sum()) == flagged[0]["size"] > 0


def test_run_report_is_json_serializable(poisoned_arrays):
    import json

    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    res = _run(feats, pred, pred_blur, y, 3, _settings(k_max=4), is_poison)
    json.dumps(res.report, allow_nan=False)


def test_a_filter_bank_scores_each_component_by_its_most_impure_filter(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    settings = _settings(filters=["mean2", "median3", "gaussian"], gaussian_sigma=0.5, k_max=4)
    view = _view(feats, pred, {"mean2": pred, "median3": pred_blur, "gaussian(sigma=0.5)": pred}, y, 3, is_poison)
    res = ci.CI(settings).run(view)
    assert sorted(view.calls) == ["gaussian(sigma=0.5)", "mean2", "median3"]  # one pass per filter
    assert res.report["filters"] == ["mean2", "median3", "gaussian(sigma=0.5)"]
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)
    poison_comp = next(c for cl in res.report["classes"] for c in cl["components"] if c["flagged"])
    assert poison_comp["impurity_per_filter"] == {
        "mean2": 0.0, "median3": pytest.approx(ci.MAX_IMPURITY, rel=1e-6), "gaussian(sigma=0.5)": 0.0}
    assert poison_comp["impurity"] == pytest.approx(ci.MAX_IMPURITY, rel=1e-6)
    assert poison_comp["flips"] == {"mean2": 0, "median3": N_POISON, "gaussian(sigma=0.5)": 0}


@pytest.fixture(scope="module")
def many_classes():
    """Eight classes of 100 to 240 images, one blob each, whose filtered decisions flip at 1 to
    5 %; class 2 also holds a far blob of 60 poisons, 55 of which flip."""
    rng = np.random.default_rng(3)
    sizes = [100, 140, 180, 120, 240, 160, 200, 220]
    rates = [0.01, 0.03, 0.02, 0.05, 0.02, 0.04, 0.01, 0.03]
    feats, y, flips = [], [], []
    for c, (n, r) in enumerate(zip(sizes, rates)):
        feats.append(rng.normal(0.0, 1.0, (n, D)) + 10.0 * rng.normal(size=D))
        y.append(np.full(n, c))
        flips.append(rng.random(n) < r)
    feats.append(rng.normal(50.0, 1.0, (N_POISON, D)))
    y.append(np.full(N_POISON, 2))
    flips.append(np.arange(N_POISON) < 55)
    feats, y, flips = np.concatenate(feats).astype(np.float32), np.concatenate(y).astype(np.int32), np.concatenate(flips)
    is_poison = np.arange(len(y)) >= len(y) - N_POISON
    pred = y.copy()
    return feats, pred, np.where(flips, (y + 1) % 8, y).astype(np.int32), y, is_poison


def test_run_with_the_test_rule_removes_the_poisons_and_reports_its_estimates(many_classes):
    feats, pred, filtered, y, is_poison = many_classes
    res = _run(feats, pred, filtered, y, 8, _settings(rule="test", alpha=0.01, k_max=3, covariance="diag"), is_poison)
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)
    est = res.report["clean_estimates"]["median3"]
    assert 0.01 < est["clean_flip_rate"] < 0.05 and est["z_critical"] > 2
    comps = [c for cl in res.report["classes"] for c in cl["components"]]
    (poison_comp,) = [c for c in comps if c["flagged"]]
    assert poison_comp["poisons"] == N_POISON and poison_comp["z"]["median3"] > est["z_critical"]
    # The score is the component's z: the poisons score highest.
    assert res.score_N[is_poison].min() > res.score_N[~is_poison].max()


def test_run_with_the_test_rule_on_clean_data_removes_nothing(many_classes):
    feats, pred, filtered, y, is_poison = many_classes
    keep = ~is_poison
    res = _run(feats[keep], pred[keep], filtered[keep], y[keep], 8,
               _settings(rule="test", k_max=3, covariance="diag"))
    assert res.is_clean_N.all()


# --- caching beside the baseline ---------------------------------------------------------------


def test_passes_and_mixtures_are_computed_once_per_baseline(poisoned_arrays, tmp_path, monkeypatch):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    fits = []
    real_cluster = mixtures.cluster
    monkeypatch.setattr(mixtures, "cluster", lambda *a: fits.append(1) or real_cluster(*a))

    def run(key, **changes):
        view = _view(feats, pred, pred_blur, y, 3, is_poison, cache_dir=tmp_path, key=key)
        return ci.CI(_settings(k_max=4, **changes)).run(view), view

    first, v1 = run("baseline-a")
    assert v1.calls == ["median3"] and fits == [1]
    assert {p.name for p in tmp_path.iterdir()} == {"pass-median3.npz", "gmm.json"}
    again, v2 = run("baseline-a", tau=0.3)  # another rule setting: the same pass and mixtures
    assert v2.calls == [] and fits == [1]
    np.testing.assert_array_equal(again.is_clean_N, first.is_clean_N)
    assert again.report["classes"] == first.report["classes"]
    _, v3 = run("baseline-b")  # another baseline: computed again
    assert v3.calls == ["median3"] and fits == [1, 1]
    _, v4 = run("baseline-b", covariance="diag")  # other mixture settings: the same pass, new mixtures
    assert v4.calls == [] and fits == [1, 1, 1]
    (tmp_path / "pass-median3.npz").write_bytes(b"damaged")
    _, v5 = run("baseline-b", covariance="diag")  # a damaged cache is a miss, not an error
    assert v5.calls == ["median3"]
