"""Cluster Impurity (ci_jax.defenses.ci) on synthetic arrays: impurity, flagging, the calibrated test
rule, and the defense end to end from precomputed features and decisions (no training; the
mixtures are test_gmm.py's, the filters test_filters.py's)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax.defenses import ci
from ci_jax.defenses import gmm as mixtures
from ci_jax.defenses.gmm import cluster

from helpers import clean_features, decisions_view, defense_settings, run_ci, run_defense

D = 5
N_CLEAN, N_POISON = 300, 60


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


def test_impurity_is_vmapped_over_filters():
    pred = np.array([0, 0, 1, 1])
    filt = np.array([[0, 0, 1, 1], [1, 0, 0, 1]])
    comp = np.array([0, 0, 1, 1])
    imp, flips, size = (np.asarray(a) for a in ci.impurity(pred, filt, comp, 2))
    assert flips.tolist() == [[0, 0], [1, 1]] and size.tolist() == [2, 2]
    assert np.allclose(imp, [[0, 0], [math.log(2), math.log(2)]])


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
    # A spread estimated from 13 components is itself noisy: the critical z lies above Bonferroni's
    # normal quantile, which would take the spread as known.
    assert est["z_critical"] > ci.stats.norm.isf(0.01 / 13)
    assert z_FK[0, 12] > est["z_critical"] > z_FK[0, :12].max()
    # The clean flip rate is the median component's, about 2.5 % here; the spread beyond the
    # binomial's is kept.
    assert 0.01 < est["clean_flip_rate"] < 0.04
    assert est["overdispersion_sd"] > 0


def test_test_rule_only_tests_eligible_components_and_counts_them_in_its_family():
    eligible = np.ones(len(SIZES), bool)
    eligible[[0, 12]] = False
    _, flagged, (est,) = ci.flip_test(FLIPS[None], SIZES, eligible, alpha=0.01)
    assert not flagged.any()
    # The same null draws, the largest z over fewer tested components: a lower critical value.
    centre, between2 = np.array([0.15]), np.array([0.01])
    every = ci._null_critical(centre, between2, SIZES, np.ones(len(SIZES), bool), 0.01, seed=0)
    assert ci._null_critical(centre, between2, SIZES, eligible, 0.01, seed=0) <= every
    assert ci._null_critical(centre, between2, SIZES, np.arange(len(SIZES)) < 3, 0.01, seed=0) < every
    # Two filters: one family of tests, one critical value; a component is flagged when either
    # filter flags it.
    quiet = np.minimum(FLIPS, 3)
    z_FK, flagged2, ests = ci.flip_test(np.stack([quiet, FLIPS]), SIZES, np.ones(len(SIZES), bool), alpha=0.01)
    assert z_FK.shape == (2, len(SIZES)) and len(ests) == 2
    assert ests[0]["z_critical"] == ests[1]["z_critical"]
    np.testing.assert_array_equal(np.flatnonzero(flagged2), [12])


def test_test_rule_ignores_empty_components():
    sizes = np.append(SIZES, 0.0)
    flips = np.append(FLIPS, 0.0)
    _, flagged, (est,) = ci.flip_test(flips[None], sizes, np.ones(len(sizes), bool), alpha=0.01)
    assert not flagged[-1] and flagged[12]
    _, _, (without,) = ci.flip_test(FLIPS[None], SIZES, np.ones(len(SIZES), bool), alpha=0.01)
    assert est == without


# --- the flip test by hand, and on the clean components of real baselines ----------------------
def _fit_by_hand(a: np.ndarray, size: np.ndarray) -> tuple[float, float]:
    """The clean estimate of one filter, one value at a time: the median; the mean deviation above
    it of the values up to the 90 % quantile and within 4 quartile-spreads of it, as a normal's sd;
    the binomial noise taken out."""
    centre = float(np.median(a))
    noise = float(np.median(1 / (4 * size + 2)))
    quartile = 1.4826 * (np.quantile(a, 0.75) - centre)
    top = np.quantile(a, 0.9)
    band = [v - centre for v in a if v > centre and v <= top and (quartile <= math.sqrt(noise) or v - centre <= 4 * quartile)]
    # E[X | 0 < X < q90] for a standard normal X
    q = ci.stats.norm.isf(0.1)
    sd = (sum(band) / max(1, len(band))) / ((ci.stats.norm.pdf(0) - ci.stats.norm.pdf(q)) / 0.4)
    return centre, max(0.0, sd ** 2 - noise)


def test_flip_test_by_hand():
    # Thirty clean components flipping 0.4 % to 2 % of their images, and one flipping 90 %.
    size = np.array([1000.0] * 30 + [500])
    flips = np.array([list(np.linspace(4, 20, 30)) + [450]])
    z, flagged, est = ci.flip_test(flips, size, np.ones(31, bool), alpha=0.01)
    assert flagged.tolist() == [False] * 30 + [True]
    # Once flagged, the poison is left out of the clean estimate.
    a = np.arcsin(np.sqrt((flips[0] + 3 / 8) / (size + 3 / 4)))
    centre, between = _fit_by_hand(a[:30], size[:30])
    assert np.isclose(est[0]["clean_flip_rate"], np.sin(centre) ** 2)
    assert np.isclose(est[0]["overdispersion_sd"], math.sqrt(between))
    assert np.isclose(z[0, 30], (a[30] - centre) / math.sqrt(between + 1 / (4 * 500 + 2)))
    # The critical value: the 99 % quantile of the largest z over 2,000 families of 31 clean
    # components, each drawn at a spread that is itself a draw's estimate (a family drawn from the
    # fit, estimated), and estimated as the data were; here one family at a time.
    rng = np.random.default_rng(0)

    def family(c: np.ndarray, b: np.ndarray) -> np.ndarray:
        normal = rng.standard_normal((ci.NULL_DRAWS, 1, 31))
        share = np.sin(np.clip(c[:, :, None] + normal * np.sqrt(b)[:, :, None], 0, np.pi / 2)) ** 2
        return np.arcsin(np.sqrt((rng.binomial(size.astype(np.int64), share) + 3 / 8) / (size + 3 / 4)))

    first = family(np.full((ci.NULL_DRAWS, 1), centre), np.full((ci.NULL_DRAWS, 1), between))
    fits = np.array([_fit_by_hand(first[d, 0], size) for d in range(ci.NULL_DRAWS)])
    second = family(fits[:, :1], fits[:, 1:])
    largest = []
    for d in range(ci.NULL_DRAWS):
        c_d, b_d = _fit_by_hand(second[d, 0], size)
        largest.append(((second[d, 0] - c_d) / np.sqrt(b_d + 1 / (4 * size + 2))).max())
    assert np.isclose(est[0]["z_critical"], np.quantile(largest, 0.99))


@pytest.mark.slow
def test_flip_test_false_alarms_stay_at_alpha_on_overdispersed_clean_components():
    # 30 clean components of 300 to 3,000 images and two filters, each component's true flip share
    # its own (normal about asin(sqrt(3 %)) on the arcsine scale, sd 0.15: shares from 0 to 15 %).
    # At alpha the chance that anything is flagged must stay at alpha. Bonferroni's normal quantile
    # with the estimated spread taken as known flagged about a fifth of such families at 1 %.
    rng = np.random.default_rng(7)
    draws, alpha, k, f = 250, 0.05, 30, 2
    alarms = 0
    for _ in range(draws):
        size = rng.integers(300, 3000, k).astype(float)
        share = np.sin(np.clip(np.arcsin(np.sqrt(0.03)) + rng.normal(0, 0.15, (f, k)), 0, np.pi / 2)) ** 2
        _, flagged, _ = ci.flip_test(rng.binomial(size.astype(np.int64), share).astype(float), size,
                                     np.ones(k, bool), alpha=alpha)
        alarms += bool(flagged.any())
    # alpha plus three binomial standard errors of the share over 250 draws.
    assert alarms / draws <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)


def test_flip_test_needs_most_components_clean():
    # Its robust spread breaks down once a quarter of the components are poisoned: with two of
    # five, the upper quartile is a poisoned one.
    size = np.array([1000.0, 1000, 1000, 500, 500])
    _, flagged, _ = ci.flip_test(np.array([[10.0, 12, 8, 450, 460]]), size, np.ones(5, bool), alpha=0.01)
    assert not flagged.any()


# The clean components of real baselines under a 3x3 median (sizes, flips), from
# runs of `ci-jax run` (MNIST default; Fashion-MNIST at 6 epochs): their flip shares spread from 0 to
# 30 %, far beyond binomial noise.
FASHION_CLEAN = ([3068, 1932, 554, 460, 1763, 3223, 1408, 3138, 1095, 1767, 1970, 1239, 844, 1947, 2541, 3459, 2265,
                  1914, 1821, 1909, 4091, 2077, 2857, 1066, 1162, 2957, 1881],
                 [34, 362, 26, 168, 26, 105, 107, 15, 216, 202, 379, 253, 269, 563, 15, 59, 163, 500, 408, 165, 21, 0,
                  0, 47, 72, 2, 8])


MNIST_CLEAN = ([685, 1043, 3195, 782, 2803, 345, 2812, 2749, 2367, 879, 2719, 2533, 2903, 810, 2129, 2852, 850, 1719,
                2982, 825, 2111, 2503, 1843, 819, 585, 515, 616, 3556, 1679, 969, 2262, 2718],
               [31, 41, 11, 1, 0, 22, 5, 1, 2, 26, 0, 3, 6, 53, 5, 2, 15, 0, 5, 42, 21, 1, 0, 22, 17, 10, 78, 7, 30, 139,
                27, 7])


def _with_poisons(clean: tuple[list[int], list[int]], sizes: list[int], flips: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([clean[1] + flips], float), np.array(clean[0] + sizes, float)


def test_flip_test_finds_the_poison_among_mnists_clean_components():
    # A poison component of 950 images, 99 % of which flip (as on MNIST).
    flips, size = _with_poisons(MNIST_CLEAN, [950], [940])
    _, flagged, _ = ci.flip_test(flips, size, np.ones(len(size), bool), alpha=0.01)
    assert flagged.tolist() == [False] * len(MNIST_CLEAN[0]) + [True]


def test_flip_test_under_fashion_mnists_spread_ranks_the_poison_first_but_holds_its_level():
    # Under a 3x3 median the clean Fashion-MNIST components flip 0 to 30 % of their decisions
    # (overdispersion sd 0.3 on the arcsine scale, most of its range): with 28 components that
    # spread is too uncertain for even a 99 % flipping component to be a 1 % outlier. It still
    # scores highest, and nothing clean is flagged.
    flips, size = _with_poisons(FASHION_CLEAN, [950], [940])
    z, flagged, (est,) = ci.flip_test(flips, size, np.ones(len(size), bool), alpha=0.01)
    assert not flagged.any() and np.argmax(z[0]) == len(size) - 1
    assert est["overdispersion_sd"] > 0.25


def test_flagged_components_leave_the_clean_estimate_so_they_cannot_hide_another(monkeypatch):
    # Seven components flipping 99 % widen the clean estimate; an eighth, flipping 440 of 600, then
    # passes as clean. Estimated again without the seven, the clean spread shows it.
    flips, size = _with_poisons(MNIST_CLEAN, [950] * 7 + [600], [940] * 7 + [440])
    eligible = np.ones(len(size), bool)
    _, flagged, (est,) = ci.flip_test(flips, size, eligible, alpha=0.01)
    assert np.flatnonzero(flagged).tolist() == list(range(len(MNIST_CLEAN[0]), len(size)))
    monkeypatch.setattr(ci, "TRIM_ROUNDS", 1)
    _, once, (est_once,) = ci.flip_test(flips, size, eligible, alpha=0.01)
    assert np.flatnonzero(once).tolist() == list(range(len(MNIST_CLEAN[0]), len(size) - 1))
    assert est["overdispersion_sd"] < est_once["overdispersion_sd"]


def test_flip_test_with_clean_components_that_never_flip():
    # Ties at the median (every clean component keeps all its decisions) leave binomial noise alone.
    size = np.array([1000.0] * 20 + [400])
    _, flagged, est = ci.flip_test(np.array([[0.0] * 20 + [300]]), size, np.ones(21, bool), alpha=0.01)
    assert flagged.tolist() == [False] * 20 + [True] and est[0]["overdispersion_sd"] == 0.0


def test_flip_test_only_flags_eligible_components():
    size = np.array([1000.0, 1000, 1000, 500])
    flips = np.array([[10.0, 12, 8, 450]])
    _, flagged, _ = ci.flip_test(flips, size, np.array([True, True, True, False]), alpha=0.01)
    assert not flagged.any()


# --- the defense from precomputed arrays -----------------------------------------------------
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
    settings = defense_settings("ci", rule="threshold", tau=0.5, bic_search=search, k_max=4)
    res = run_ci(feats, pred, pred_blur, y, 3, settings, is_poison)

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
    settings = defense_settings("ci", rule="threshold", tau=0.5, k_max=4)
    res = run_ci(feats, pred, pred_blur, y, 10, settings, is_poison)
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
    res = run_ci(feats, pred, pred_blur, y, 3, defense_settings("ci", k_max=4))
    for c in res.report["classes"]:
        for comp in c["components"]:
            assert "poisons" not in comp
    assert int((~res.is_clean_N).sum()) == N_POISON


def test_run_top1_removes_the_poison_component(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    res = run_ci(feats, pred, pred_blur, y, 3, defense_settings("ci", rule="top1", k_max=4), is_poison)
    np.testing.assert_array_equal(res.is_clean_N, ~is_poison)


def test_run_on_clean_data_flags_nothing_under_threshold(poisoned_arrays):
    feats, pred, _, y, is_poison = poisoned_arrays
    feats, pred, y = feats[~is_poison], pred[~is_poison], y[~is_poison]
    res = run_ci(feats, pred, pred.copy(), y, 3, defense_settings("ci", rule="threshold", tau=0.5, k_max=4),
                 np.zeros(len(y), bool))
    assert res.is_clean_N.all()
    np.testing.assert_array_equal(res.score_N, 0.0)
    for c in res.report["classes"]:
        for comp in c["components"]:
            assert comp["impurity"] == 0.0 and not comp["flagged"] and comp["poisons"] == 0


def test_run_top1_on_clean_data_still_removes_one_component(poisoned_arrays):
    feats, pred, _, y, is_poison = poisoned_arrays
    feats, pred, y = feats[~is_poison], pred[~is_poison], y[~is_poison]
    res = run_ci(feats, pred, pred.copy(), y, 3, defense_settings("ci", rule="top1", k_max=4))
    flagged = [comp for c in res.report["classes"] for comp in c["components"] if comp["flagged"]]
    assert len(flagged) == 1
    assert int((~res.is_clean_N).sum()) == flagged[0]["size"] > 0


def test_run_report_is_json_serializable(poisoned_arrays):
    import json

    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    res = run_ci(feats, pred, pred_blur, y, 3, defense_settings("ci", k_max=4), is_poison)
    json.dumps(res.report, allow_nan=False)


def test_a_filter_bank_scores_each_component_by_its_most_impure_filter(poisoned_arrays):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    settings = defense_settings("ci", filters=["mean2", "median3", "gaussian"], gaussian_sigma=0.5, k_max=4)
    view = decisions_view(feats, pred, {"mean2": pred, "median3": pred_blur, "gaussian(sigma=0.5)": pred}, y, 3,
                          is_poison)
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
    res = run_ci(feats, pred, filtered, y, 8,
                 defense_settings("ci", rule="test", alpha=0.01, k_max=3, covariance="diag"), is_poison)
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
    res = run_ci(feats[keep], pred[keep], filtered[keep], y[keep], 8,
                 defense_settings("ci", rule="test", k_max=3, covariance="diag"))
    assert res.is_clean_N.all()


def test_ci_flags_nothing_on_clean_features():
    feats_ND, y_N = clean_features()
    res = run_defense("ci", feats_ND, y_N, **{"defense.ci.covariance": "diag"})
    assert res.is_clean_N.all() and all(c["k"] == 1 for c in res.report["classes"])


# --- caching beside the baseline ---------------------------------------------------------------
def test_passes_and_mixtures_are_computed_once_per_baseline(poisoned_arrays, tmp_path, monkeypatch):
    feats, pred, pred_blur, y, is_poison = poisoned_arrays
    fits = []
    real_cluster = mixtures.cluster
    monkeypatch.setattr(mixtures, "cluster", lambda *a: fits.append(1) or real_cluster(*a))

    def run(key, **changes):
        view = decisions_view(feats, pred, pred_blur, y, 3, is_poison, cache_dir=tmp_path, key=key)
        return ci.CI(defense_settings("ci", k_max=4, **changes)).run(view), view

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
