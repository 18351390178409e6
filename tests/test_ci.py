"""Cluster Impurity on synthetic arrays: BIC model choice, clustering, impurity, flagging,
filters, and the defense end to end from precomputed features and decisions (no training)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import config
from ci_jax.config import Config
from ci_jax.defenses import ci

D = 5


def _cfg(**kw) -> Config:
    return config.replace(Config(), **kw)


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
    return ci.choose_k(mixture_ND, _cfg(bic_search="sweep", k_max=6))


@pytest.fixture(scope="module")
def ascent_fit(mixture_ND):
    return ci.choose_k(mixture_ND, _cfg(bic_search="ascent", k_max=10))


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
    gmm, bics, _ = ci.choose_k(x_ND, _cfg(bic_search=search, k_max=3 if search == "sweep" else 10))
    assert gmm.n_components == 1
    assert int(np.argmin(bics)) == 0
    assert len(bics) == 3  # ascent: k = 2 and 3 fail to improve; sweep: k_max


@pytest.mark.parametrize("search", ["sweep", "ascent"])
def test_k_never_exceeds_the_number_of_points(search):
    x_ND = np.random.default_rng(2).normal(0.0, 1.0, (3, D))
    gmm, bics, note = ci.choose_k(x_ND, _cfg(bic_search=search, k_max=10, reg_covar=1e-3))
    assert 1 <= gmm.n_components <= 3
    assert len(bics) <= 3
    assert "k capped at 3" in note


def test_single_point_class_is_one_component():
    gmm, bics, note = ci.choose_k(np.ones((1, D)), _cfg(bic_search="sweep", k_max=10))
    assert gmm is None and bics == [] and "too few" in note
    feats = np.concatenate([np.random.default_rng(0).normal(size=(50, D)), np.ones((1, D))])
    y = np.array([0] * 50 + [1])
    comp, classes = ci.cluster(feats, y, 2, _cfg(bic_search="sweep", k_max=3))
    assert classes[1]["k"] == 1 and "too few" in classes[1]["note"]
    assert comp[-1] == classes[0]["k"]


def test_k_max_1_fits_one_component(mixture_ND):
    gmm, bics, _ = ci.choose_k(mixture_ND, _cfg(bic_search="sweep", k_max=1))
    assert gmm.n_components == 1 and len(bics) == 1


@pytest.mark.parametrize("covariance", ["diag", "spherical", "tied"])
def test_other_covariance_types_also_find_the_mixture(mixture_ND, covariance):
    gmm, _, _ = ci.choose_k(mixture_ND, _cfg(bic_search="ascent", k_max=5, covariance=covariance))
    assert gmm.covariance_type == covariance
    assert gmm.n_components == 3


def test_choose_k_is_deterministic_for_a_seed(mixture_ND):
    cfg = _cfg(bic_search="sweep", k_max=3, seed=3)
    g1, b1, _ = ci.choose_k(mixture_ND, cfg)
    g2, b2, _ = ci.choose_k(mixture_ND, cfg)
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
    gmm, bics, _ = ci.choose_k(x_ND, _cfg(bic_search="sweep", k_max=10, covariance=covariance))
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
    gmm, _, got = ci.choose_k(_degenerate(name), _cfg(bic_search="sweep", k_max=10))
    assert note in got
    if k is not None:
        assert gmm.n_components == k


def test_a_k_that_cannot_be_fitted_ends_the_search_with_the_best_smaller_k():
    # Full covariances of 1e30-scale blobs: some k > 1 fails in sklearn ("ill-defined empirical
    # covariance"); the search stops there and keeps the best k before it.
    gmm, bics, note = ci.choose_k(_degenerate("huge_scale"), _cfg(bic_search="sweep", k_max=10))
    assert "could not be fitted" in note and "kept the best smaller fit" in note
    failed_k = int(note.split("k=")[1].split(" ")[0])
    assert len(bics) == failed_k - 1 and gmm.n_components == int(np.argmin(bics)) + 1


def test_a_class_where_even_k_1_fails_is_one_component(monkeypatch):
    def fails(feats_ND, k, cfg):
        raise ValueError("Fitting the mixture model failed. Try something else.")

    monkeypatch.setattr(ci, "_fit", fails)
    gmm, bics, note = ci.choose_k(_mixture(n_per=20), _cfg(k_max=4))
    assert gmm is None and bics == []
    assert note == "k=1 could not be fitted (Fitting the mixture model failed); kept as one component"


def test_cluster_reports_degenerate_classes_and_stays_json():
    import json

    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(60, D)), _degenerate("identical_rows"), _degenerate("nan"),
              _degenerate("duplicated_rows"), _degenerate("fewer_than_k")]
    feats = np.concatenate(blocks)
    y = np.concatenate([np.full(len(b), i) for i, b in enumerate(blocks)])
    comp, classes = ci.cluster(feats, y, 5, _cfg(bic_search="ascent", k_max=10))
    assert (comp >= 0).all()
    notes = {c["label"]: c.get("note") for c in classes}
    assert "identical features" in notes[1] and "NaN" in notes[2]
    assert "k capped at 3" in notes[3] and "k capped at 3" in notes[4]
    assert classes[1]["k"] == classes[2]["k"] == 1
    json.dumps(classes, allow_nan=False)
    # The defense end to end still runs and scores every sample.
    pred = np.zeros(len(y), np.int32)
    res = ci.run(feats, pred, pred, y, 5, _cfg(bic_search="ascent", k_max=10))
    assert res.score_N.shape == y.shape and np.isfinite(res.score_N).all()


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
    cfg = _cfg(bic_search="sweep", k_max=4)
    comp, classes = ci.cluster(feats, y, 5, cfg)
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
    comp2, classes2 = ci.cluster(feats, y, 5, cfg)
    np.testing.assert_array_equal(comp, comp2)
    assert classes == classes2


# --- impurity ----------------------------------------------------------------------------------


def test_impurity_hand_computed():
    # Component 0 (A): 4 samples, none changed. 1 (B): 4 samples, 2 changed. 2 (C): 3 samples,
    # all changed. 3: no members.
    comp = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    pred = np.array([1, 2, 3, 4, 5, 5, 5, 5, 7, 7, 7])
    blur = np.array([1, 2, 3, 4, 5, 0, 5, 0, 1, 2, 3])
    imp, size = ci.impurity(jnp.asarray(pred), jnp.asarray(blur), jnp.asarray(comp), 4)
    imp, size = np.asarray(imp, np.float64), np.asarray(size)
    assert imp.shape == size.shape == (4,)
    np.testing.assert_array_equal(size, [4, 4, 3, 0])
    assert imp[0] == 0.0
    assert imp[1] == pytest.approx(math.log(2), rel=1e-6)
    assert np.isfinite(imp).all()
    assert imp[2] == pytest.approx(ci.MAX_IMPURITY, rel=1e-6)
    assert imp[3] == 0.0  # an empty component is pure and has size 0
    assert imp[2] == imp.max()


def test_max_impurity_is_minus_log_of_the_floor():
    assert ci.MAX_IMPURITY == pytest.approx(-math.log(ci.P_FLOOR))
    assert math.isfinite(ci.MAX_IMPURITY)


def test_impurity_is_minus_log_of_the_unchanged_fraction():
    rng = np.random.default_rng(0)
    n, k = 200, 5
    comp = rng.integers(0, k, n)
    pred = rng.integers(0, 10, n)
    blur = np.where(rng.random(n) < 0.3, rng.integers(0, 10, n), pred)
    imp, size = ci.impurity(jnp.asarray(pred), jnp.asarray(blur), jnp.asarray(comp), k)
    for j in range(k):
        m = comp == j
        assert size[j] == m.sum()
        p = np.mean(pred[m] == blur[m])
        assert float(imp[j]) == pytest.approx(-math.log(max(p, ci.P_FLOOR)), rel=1e-5, abs=1e-6)


def test_pure_component_impurity_is_positive_zero():
    imp, _ = ci.impurity(jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), 2)
    assert not np.signbit(np.asarray(imp)).any()


# --- flag --------------------------------------------------------------------------------------


def test_threshold_flags_impure_components_of_split_classes_only():
    imp = np.array([0.0, 2.0, 0.7, 0.4, 5.0, 0.51])
    k_of_comp = np.array([3, 3, 3, 2, 1, 2])  # comps 0-2: a k=3 class; 3, 5: k=2; 4: a k=1 class
    flagged = ci.flag(imp, k_of_comp, "threshold", 0.5)
    assert flagged.dtype == bool
    np.testing.assert_array_equal(flagged, [False, True, True, False, False, True])


def test_threshold_never_flags_a_k1_class():
    imp = np.full(3, ci.MAX_IMPURITY)
    assert not ci.flag(imp, np.ones(3, int), "threshold", 0.0).any()


def test_threshold_boundary_is_strict():
    imp = np.array([0.5, 0.5 + 1e-9, 0.5 - 1e-9])
    flagged = ci.flag(imp, np.full(3, 3), "threshold", 0.5)
    np.testing.assert_array_equal(flagged, [False, True, False])


def test_threshold_tau_zero_flags_every_impure_component_of_split_classes():
    imp = np.array([0.0, 1e-6, 0.0])
    np.testing.assert_array_equal(ci.flag(imp, np.full(3, 3), "threshold", 0.0), [False, True, False])


@pytest.mark.parametrize("imp, expected", [
    ([0.1, 3.0, 0.2, 2.9], 1),
    ([0.0, 0.0, 0.0], 0),           # all pure: still exactly one
    ([0.0, 0.0, ci.MAX_IMPURITY], 2),
    ([0.3], 0),
])
def test_top1_flags_exactly_the_argmax(imp, expected):
    imp = np.array(imp)
    k_of_comp = np.ones(len(imp), int)  # top1 ignores k, even k == 1 classes
    flagged = ci.flag(imp, k_of_comp, "top1", 100.0)
    assert flagged.sum() == 1
    assert flagged[expected]


# --- filters -----------------------------------------------------------------------------------


def _img(h, w, c=1, pixels=()):
    x = np.zeros((1, h, w, c), np.float32)
    for (i, j, ch, v) in pixels:
        x[0, i, j, ch] = v
    return x


def test_mean2_single_bright_pixel():
    x = _img(3, 3, pixels=[(1, 1, 0, 1.0)])
    out = np.asarray(ci.make_filter("mean2")(jnp.asarray(x)))
    expected = np.zeros((3, 3), np.float32)
    expected[0:2, 0:2] = 0.25
    assert out.shape == x.shape
    np.testing.assert_allclose(out[0, :, :, 0], expected, atol=1e-7)


def test_mean2_is_the_same_size_2x2_mean_with_zero_pad_bottom_right():
    x = np.random.default_rng(0).random((1, 3, 3, 1)).astype(np.float32)
    xp = np.pad(x[0, :, :, 0], ((0, 1), (0, 1)))
    expected = np.array([[xp[i:i + 2, j:j + 2].mean() for j in range(3)] for i in range(3)])
    out = np.asarray(ci.make_filter("mean2")(jnp.asarray(x)))
    np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-6, atol=1e-6)


def test_mean3_hand_computed():
    x = _img(5, 5, pixels=[(2, 2, 0, 9.0), (0, 0, 0, 9.0)])
    out = np.asarray(ci.make_filter("mean3")(jnp.asarray(x)))[0, :, :, 0]
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] += 1.0   # centre pixel spreads 9/9 over its 3x3 neighbourhood
    expected[0:2, 0:2] += 1.0   # corner pixel: zero padding, spreads over the 2x2 inside
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_median3_removes_an_isolated_bright_pixel_and_keeps_a_block():
    x = _img(7, 7, pixels=[(1, 5, 0, 1.0)])
    x[0, 2:5, 1:4, 0] = 0.5  # a 3x3 block
    out = np.asarray(ci.make_filter("median3")(jnp.asarray(x)))[0, :, :, 0]
    assert out[1, 5] == 0.0
    assert out[3, 2] == 0.5  # the block's centre survives (9 of 9 taps are 0.5)
    # The block's corners see 4 of 9 taps at 0.5 -> median 0; its edges see 6 of 9 -> 0.5.
    assert out[2, 1] == 0.0 and out[2, 2] == 0.5
    expected = np.zeros((7, 7), np.float32)
    expected[2:5, 2] = 0.5
    expected[3, 1:4] = 0.5
    np.testing.assert_array_equal(out, expected)


def test_gaussian_preserves_a_constant_interior_and_sums_to_one():
    x = np.full((1, 16, 16, 1), 0.7, np.float32)
    for sigma in (0.0, 1.0, 1.5):  # 0 -> default sigma 1
        out = np.asarray(ci.make_filter("gaussian", sigma)(jnp.asarray(x)))
        r = max(1, math.ceil(2 * (sigma or 1.0)))
        np.testing.assert_allclose(out[0, r:-r, r:-r, 0], 0.7, rtol=1e-5)
        assert out[0, 0, 0, 0] < 0.7  # zero padding darkens the border
    k = np.asarray(ci._gaussian_kernel(1.0))
    assert k.shape == (5, 5)
    assert k.sum() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(k, k.T)
    assert k[2, 2] == k.max()


def test_noise_is_deterministic_and_bounded():
    x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3)), jnp.float32)
    for half_width, param in ((0.1, 0.0), (0.05, 0.05)):
        f = ci.make_filter("noise", param, seed=3)
        a, b = np.asarray(f(x)), np.asarray(f(x))
        np.testing.assert_array_equal(a, b)
        d = a - np.asarray(x)
        assert np.abs(d).max() <= half_width + 1e-6
        assert np.abs(d).max() > half_width / 2  # it does add noise
        assert not np.allclose(d[0], d[1])  # each image gets its own noise
    # Same input, same seed, fresh filter -> same output; another seed -> other noise.
    np.testing.assert_array_equal(np.asarray(ci.make_filter("noise", 0.1, 3)(x)),
                                  np.asarray(ci.make_filter("noise", 0.1, 3)(x)))
    assert not np.array_equal(np.asarray(ci.make_filter("noise", 0.1, 3)(x)),
                              np.asarray(ci.make_filter("noise", 0.1, 4)(x)))


@pytest.mark.parametrize("name", config.FILTERS)
@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3)])
def test_every_filter_keeps_the_shape_and_dtype(name, shape):
    x = jnp.asarray(np.random.default_rng(0).random(shape), jnp.float32)
    out = ci.make_filter(name)(x)
    assert out.shape == shape
    assert out.dtype == x.dtype
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", ["mean2", "mean3", "median3", "gaussian"])
def test_channels_are_filtered_independently(name):
    rng = np.random.default_rng(1)
    x = _img(6, 6, c=3)
    x[0, :, :, 1] = rng.random((6, 6))
    f = ci.make_filter(name)
    out = np.asarray(f(jnp.asarray(x)))
    assert (out[..., 0] == 0).all() and (out[..., 2] == 0).all()
    alone = np.asarray(f(jnp.asarray(x[..., 1:2])))
    np.testing.assert_allclose(out[..., 1:2], alone, rtol=1e-6, atol=1e-7)


def test_unknown_filter_raises():
    with pytest.raises(ValueError, match="blur"):
        ci.make_filter("blur")


# --- run: the defense from precomputed arrays --------------------------------------------------


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
    cfg = _cfg(rule="threshold", tau=0.5, bic_search=search, k_max=4)
    res = ci.run(feats, pred, pred_blur, y, 3, cfg, is_poison_N=is_poison)

    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)
    assert res.is_clean_N.dtype == bool
    assert res.report["method"] == "ci"
    assert res.report["removed"] == N_POISON
    assert set(res.timings_s) == {"gmm", "impurity"}

    classes = res.report["classes"]
    assert [c["label"] for c in classes] == [0, 1, 2]
    assert [c["k"] for c in classes] == [1, 1, 2]
    for c in classes:
        assert "offset" not in c
        assert len(c["components"]) == c["k"]
        assert sum(comp["size"] for comp in c["components"]) == int((y == c["label"]).sum())
        for comp in c["components"]:
            assert set(comp) == {"size", "impurity", "flagged", "poisons"}
    for c in classes[:2]:
        (comp,) = c["components"]
        assert comp == {"size": N_CLEAN, "impurity": 0.0, "flagged": False, "poisons": 0}
    by_flag = {comp["flagged"]: comp for comp in classes[2]["components"]}
    assert by_flag[True]["size"] == by_flag[True]["poisons"] == N_POISON
    assert by_flag[True]["impurity"] == pytest.approx(ci.MAX_IMPURITY, rel=1e-6)
    assert by_flag[False] == {"size": N_CLEAN, "impurity": 0.0, "flagged": False, "poisons": 0}

    # score_N: each sample's component impurity.
    assert res.score_N.shape == y.shape
    np.testing.assert_allclose(res.score_N[is_poison], by_flag[True]["impurity"])
    np.testing.assert_array_equal(res.score_N[~is_poison], 0.0)


def test_run_score_equals_the_component_impurity_of_each_sample(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    # Some clean decisions of class 0 change too, so class-0 scores are not all 0 or MAX.
    rng = np.random.default_rng(9)
    pred_blur = np.where((y == 0) & (rng.random(len(y)) < 0.2), 9, pred_blur)
    cfg = _cfg(rule="threshold", tau=0.5, k_max=4)
    res = ci.run(feats, pred, pred_blur, y, 3, cfg, is_poison_N=is_poison)
    comp, classes = ci.cluster(feats, y, 3, cfg)  # deterministic: the same components
    imp = np.concatenate([[x["impurity"] for x in c["components"]] for c in res.report["classes"]])
    np.testing.assert_array_equal(res.score_N, imp[comp])
    p0 = np.mean(pred[y == 0] == pred_blur[y == 0])
    assert res.report["classes"][0]["components"][0]["impurity"] == pytest.approx(-math.log(p0), rel=1e-5)
    # Class 0 was not split: impure, but not flagged under the threshold rule.
    assert not res.report["classes"][0]["components"][0]["flagged"]
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)


def test_run_without_ground_truth_has_no_poison_counts(poisoned_arrays):
    feats, pred, pred_blur, y, _ = poisoned_arrays
    res = ci.run(feats, pred, pred_blur, y, 3, _cfg(k_max=4))
    for c in res.report["classes"]:
        for comp in c["components"]:
            assert "poisons" not in comp
    assert res.report["removed"] == N_POISON


def test_run_top1_removes_the_poison_component(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    res = ci.run(feats, pred, pred_blur, y, 3, _cfg(rule="top1", k_max=4), is_poison_N=is_poison)
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)


def test_run_on_clean_data_flags_nothing_under_threshold(poisoned_arrays):
    feats, pred, _, y, is_poison = poisoned_arrays
    feats, pred, y = feats[~is_poison], pred[~is_poison], y[~is_poison]
    res = ci.run(feats, pred, pred.copy(), y, 3, _cfg(rule="threshold", tau=0.5, k_max=4),
                 is_poison_N=np.zeros(len(y), bool))
    assert res.is_clean_N.all()
    assert res.report["removed"] == 0
    np.testing.assert_array_equal(res.score_N, 0.0)
    for c in res.report["classes"]:
        for comp in c["components"]:
            assert comp["impurity"] == 0.0 and not comp["flagged"] and comp["poisons"] == 0


def test_run_top1_on_clean_data_still_removes_one_component(poisoned_arrays):
    feats, pred, _, y, is_poison = poisoned_arrays
    feats, pred, y = feats[~is_poison], pred[~is_poison], y[~is_poison]
    res = ci.run(feats, pred, pred.copy(), y, 3, _cfg(rule="top1", k_max=4))
    flagged = [comp["flagged"] for c in res.report["classes"] for comp in c["components"]]
    assert sum(flagged) == 1
    assert res.report["removed"] == int((~res.is_clean_N).sum()) > 0


def test_run_report_is_json_serializable(poisoned_arrays):
    import json

    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    res = ci.run(feats, pred, pred_blur, y, 3, _cfg(k_max=4), is_poison_N=is_poison)
    json.dumps(res.report, allow_nan=False)
