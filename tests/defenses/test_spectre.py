"""SPECTRE, SCAn and STRIP on planted poisons; CI's calibrated test and filter bank; ART's
detect_poison."""

import math

import numpy as np
import pytest

from ci_jax import config, data, defenses, train
from ci_jax.defenses import ac, ci, scan, spectre
from ci_jax.defenses.base import Reserve, View
from ci_jax.errors import UserError

K, D, TARGET = 10, 16, 2


def _planted(n_per_class=400, n_poison=40, seed=0, reserve_per_class=40):
    """Class clusters in D dims; poisons labelled TARGET sit in a cluster of their own, far from
    the target's own images. Returns (feats_ND, y_N, is_poison_N, reserve feats, reserve labels)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, (K, D))
    y = np.repeat(np.arange(K), n_per_class)
    feats = means[y] + rng.normal(0, 1, (len(y), D))
    poison_mean = means[TARGET] + 8 * rng.normal(0, 1, D) / math.sqrt(D)
    poisons = poison_mean + rng.normal(0, 0.5, (n_poison, D))
    feats = np.concatenate([feats, poisons])
    y = np.concatenate([y, np.full(n_poison, TARGET)])
    is_poison = np.concatenate([np.zeros(K * n_per_class, bool), np.ones(n_poison, bool)])
    ry = np.repeat(np.arange(K), reserve_per_class)
    rf = means[ry] + rng.normal(0, 1, (len(ry), D))
    return feats.astype(np.float32), y.astype(np.int32), is_poison, rf.astype(np.float32), ry.astype(np.int32)


def _view(feats, y, is_poison, reserve=None, seed=0, predict=None, x=None):
    return View(x_NHWC=x if x is not None else np.zeros((len(y), 1, 1, 1), np.float32), y_N=y, feats_ND=feats,
                pred_N=y.copy(), num_classes=K, predict=predict, seed=seed, reserve=reserve, is_poison_N=is_poison)


def _settings(name, **fields):
    cfg = config.preset("default", {**{f"defense.{name}.{k}": v for k, v in fields.items()}})
    return getattr(cfg.defense, name)


# -- SPECTRE ----------------------------------------------------------------------------------------
def test_spectre_finds_the_planted_poisons_and_removes_one_and_a_half_eps_per_class():
    feats, y, is_poison, _, _ = _planted()
    res = defenses.build("spectre", _settings("spectre", eps=0.1)).run(_view(feats, y, is_poison))
    removed = ~res.is_clean_N
    assert removed[is_poison].all()
    for c in range(K):
        n = int((y == c).sum())
        assert removed[y == c].sum() == round(1.5 * round(0.1 * n))
    assert res.report["top_class"] == TARGET


def test_spectre_only_top_class_removes_from_the_target_alone():
    feats, y, is_poison, _, _ = _planted()
    res = defenses.build("spectre", _settings("spectre", eps=0.1, only_top_class=True)).run(_view(feats, y, is_poison))
    removed = ~res.is_clean_N
    assert removed[is_poison].all() and not removed[y != TARGET].any()


@pytest.mark.parametrize("n", [2, 5, 12, 40])
def test_spectre_small_classes_give_finite_scores_and_lose_no_more_than_their_share(n):
    feats, y, is_poison, _, _ = _planted(n_poison=0)
    keep = np.concatenate([np.flatnonzero(y != 4), np.flatnonzero(y == 4)[:n]])
    feats, y = feats[keep], y[keep]
    res = defenses.build("spectre", _settings("spectre", eps=0.1)).run(_view(feats, y, np.zeros(len(y), bool)))
    assert np.isfinite(res.score_N).all()
    expected = round(1.5 * round(0.1 * n)) if n >= 3 else 0
    assert (~res.is_clean_N[y == 4]).sum() == expected


def test_robust_subset_drops_outliers_and_keeps_the_bulk():
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.normal(0, 1, (900, 4)), rng.normal(0, 1, (100, 4)) + [0, 0, 0, 12]])
    keep = spectre.robust_subset(z, 0.1, 200)
    assert keep[:900].mean() > 0.9 and keep[900:].mean() < 0.1
    assert (~keep).sum() <= 200


def test_que_with_identity_covariance_weighs_every_direction_alike():
    h = np.random.default_rng(0).normal(0, 1, (20000, 3))
    scores, spike = spectre._que(h, 4.0)
    assert abs(spike - 1) < 0.1 and np.allclose(scores.mean(), 1.0, atol=0.1)  # about |h|^2 / 3


# -- SCAn -------------------------------------------------------------------------------------------
def test_scan_flags_only_the_target_class_and_removes_its_poisons():
    feats, y, is_poison, rf, ry = _planted()
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    res = defenses.build("scan", _settings("scan")).run(_view(feats, y, is_poison, reserve))
    flagged = [c["label"] for c in res.report["classes"] if c["flagged"]]
    assert flagged == [TARGET]
    removed = ~res.is_clean_N
    assert removed[is_poison].mean() >= 0.95 and removed[~is_poison].mean() <= 0.01


def test_scan_on_clean_features_flags_nothing():
    feats, y, is_poison, rf, ry = _planted(n_poison=0)
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    res = defenses.build("scan", _settings("scan")).run(_view(feats, y, is_poison, reserve))
    assert res.is_clean_N.all()


def test_scan_global_model_recovers_the_two_covariances():
    rng = np.random.default_rng(0)
    s_mu_true, s_e_true = np.diag([9.0, 4.0, 1.0]), np.diag([1.0, 0.5, 0.25])
    mu = rng.multivariate_normal(np.zeros(3), s_mu_true, 200)
    y = np.repeat(np.arange(200), 50)
    x = mu[y] + rng.multivariate_normal(np.zeros(3), s_e_true, len(y))
    s_mu, s_e, converged = scan.global_model(x - x.mean(0), y)
    assert converged
    assert np.allclose(np.diag(s_e), np.diag(s_e_true), rtol=0.1)
    assert np.allclose(np.diag(s_mu), np.diag(s_mu_true), rtol=0.3)


def test_scan_class_that_2_means_cannot_split_scores_zero_and_keeps_its_images():
    feats, y, is_poison, rf, ry = _planted(n_poison=0)
    feats[y == 3] = rf[ry == 3] = feats[y == 3][0]  # every image of class 3 alike: no second subgroup
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    res = defenses.build("scan", _settings("scan")).run(_view(feats, y, is_poison, reserve))
    assert np.isfinite(res.score_N).all() and (res.score_N[y == 3] == 0).all() and res.is_clean_N[y == 3].all()


def test_scan_and_strip_need_a_reserve():
    for name in ("scan", "strip"):
        with pytest.raises(UserError, match="--eval.reserve"):
            config.preset("default", {"defense.name": name})
    feats, y, is_poison, _, _ = _planted()
    with pytest.raises(UserError, match="--eval.reserve"):
        defenses.build("scan", _settings("scan")).run(_view(feats, y, is_poison))


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


def test_ss_removes_one_and_a_half_eps_despite_rounding():
    # 1.5 x 0.3 x 100 is 44.999... in floating point: 45 images are meant.
    feats, y, is_poison, _, _ = _planted(n_per_class=100, n_poison=0)
    res = defenses.build("ss", _settings("ss", eps=0.3)).run(_view(feats, y, is_poison))
    assert all(c["removed"] == 45 for c in res.report["classes"])


# -- STRIP ------------------------------------------------------------------------------------------
def _strip_model(x_NHWC, transform=None, desc=None, logits=False):
    """A stand-in model: a corner pixel of 1 or more (the trigger, which survives any blend) gives a
    confident class TARGET; otherwise the logits vary with the image, so entropy is high."""
    x = np.asarray(transform(x_NHWC) if transform is not None else x_NHWC)
    flat = x.reshape(len(x), -1)
    out = np.sin(flat[:, :K] * 7.0 + np.arange(K)) * 0.5
    trig = flat[:, 0] >= 1.0
    out[trig] = -10.0
    out[trig, TARGET] = 10.0
    pred = out.argmax(1).astype(np.int32)
    return (pred, flat[:, :4], out) if logits else (pred, flat[:, :4])


def test_strip_removes_images_whose_blends_stay_confident():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.45, (300, 4, 4, 1)).astype(np.float32)
    y = (np.arange(300) % K).astype(np.int32)
    is_poison = np.zeros(300, bool)
    is_poison[:20] = True
    x[:20, 0, 0, 0] = 1.0
    rx = rng.uniform(0, 0.45, (200, 4, 4, 1)).astype(np.float32)
    ry = (np.arange(200) % K).astype(np.int32)
    reserve = Reserve(rx, ry, np.zeros((200, 4)), ry.copy(), np.arange(200))
    view = _view(np.zeros((300, 4), np.float32), y, is_poison, reserve, predict=_strip_model, x=x)
    res = defenses.build("strip", _settings("strip", blends=8)).run(view)
    removed = ~res.is_clean_N
    assert removed[is_poison].all() and removed[~is_poison].mean() <= 0.05
    assert res.report["blend_images"] == 8 and res.report["clean_images_for_cut_off"] == 192


def test_strip_with_clean_entropies_all_alike_uses_their_quantile():
    # A model whose softmax is uniform for everything: every entropy is log K, sd 0, no normal fits.
    flat = lambda x, transform=None, desc=None, logits=False: (
        np.zeros(len(x), np.int32), np.zeros((len(x), 4)), np.zeros((len(x), K))) if logits else None
    rng = np.random.default_rng(0)
    x, rx = rng.uniform(0, 1, (50, 2, 2, 1)).astype(np.float32), rng.uniform(0, 1, (40, 2, 2, 1)).astype(np.float32)
    y, ry = (np.arange(50) % K).astype(np.int32), (np.arange(40) % K).astype(np.int32)
    view = _view(np.zeros((50, 4), np.float32), y, np.zeros(50, bool),
                 Reserve(rx, ry, np.zeros((40, 4)), ry.copy(), np.arange(40)), predict=flat, x=x)
    res = defenses.build("strip", _settings("strip", blends=4)).run(view)
    assert np.isclose(res.report["cut_off_entropy"], math.log(K)) and res.is_clean_N.all()
    assert np.isfinite(res.score_N).all()


def test_strip_says_when_its_normal_cut_off_falls_below_zero():
    # Clean entropies 0 (nine in ten) or log K: mean 0.1 log K, sd 0.3 log K, so the normal's 1 %
    # quantile is about -0.6 log K; the empirical quantile, 0, removes nothing either, and says why.
    def model(x, transform=None, desc=None, logits=False):
        sure = (np.arange(len(x)) % 10 != 0)[:, None] * np.eye(K)[np.zeros(len(x), int)] * 100.0
        return np.zeros(len(x), np.int32), np.zeros((len(x), 4)), sure
    rng = np.random.default_rng(0)
    x, rx = rng.uniform(0, 1, (50, 2, 2, 1)).astype(np.float32), rng.uniform(0, 1, (104, 2, 2, 1)).astype(np.float32)
    y, ry = (np.arange(50) % K).astype(np.int32), (np.arange(104) % K).astype(np.int32)
    view = lambda: _view(np.zeros((50, 4), np.float32), y, np.zeros(50, bool),
                         Reserve(rx, ry, np.zeros((104, 4)), ry.copy(), np.arange(104)), predict=model, x=x)
    res = defenses.build("strip", _settings("strip", blends=4)).run(view())
    assert res.report["cut_off_entropy"] < 0 and res.is_clean_N.all()
    assert "nothing can be removed" in res.report["note"] and "threshold: empirical" in res.report["note"]
    res = defenses.build("strip", _settings("strip", blends=4, threshold="empirical")).run(view())
    assert res.report["cut_off_entropy"] == 0.0 and res.is_clean_N.all()
    assert "entropy 0 under every blend" in res.report["note"] and "threshold: empirical" not in res.report["note"]


def test_strip_entropy_of_a_uniform_softmax_is_log_k():
    assert np.allclose(defenses.strip.entropy_N(np.zeros((3, K))), math.log(K))


# -- CI's test rule and bank ------------------------------------------------------------------------
def test_flip_test_by_hand():
    # Thirty clean components flipping 0.4 % to 2 % of their images, and one flipping 90 %.
    size = np.array([1000.0] * 30 + [500])
    flips = np.array([list(np.linspace(4, 20, 30)) + [450]])
    z, flagged, est = ci.flip_test(flips, size, np.ones(31, bool), alpha=0.01)
    assert flagged.tolist() == [False] * 30 + [True]
    a = np.arcsin(np.sqrt((flips[0] + 3 / 8) / (size + 3 / 4)))
    centre = np.median(a)
    assert np.isclose(est[0]["clean_flip_rate"], np.sin(centre) ** 2)
    between = max(0.0, (1.4826 * (np.quantile(a, 0.75) - centre)) ** 2 - 1 / (4 * 1000 + 2))
    assert np.isclose(est[0]["overdispersion_sd"], math.sqrt(between))
    assert np.isclose(z[0, 30], (a[30] - centre) / math.sqrt(between + 1 / (4 * 500 + 2)))
    # Bonferroni over 31 components and 1 filter at 1 %: the one-sided normal quantile of 0.01 / 31.
    assert np.isclose(est[0]["z_critical"], 3.4119, atol=1e-3)


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


@pytest.mark.parametrize("clean", [FASHION_CLEAN, MNIST_CLEAN], ids=["fashion", "mnist"])
def test_flip_test_tolerates_heterogeneous_clean_components_and_finds_the_poison(clean):
    sizes, flips = clean
    # A poison component of 950 images, 99 % of which flip (as on both datasets).
    size = np.array(sizes + [950], float)
    _, flagged, _ = ci.flip_test(np.array([flips + [940]], float), size, np.ones(len(size), bool), alpha=0.01)
    assert flagged.tolist() == [False] * len(sizes) + [True]


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


def test_impurity_is_vmapped_over_filters():
    pred = np.array([0, 0, 1, 1])
    filt = np.array([[0, 0, 1, 1], [1, 0, 0, 1]])
    comp = np.array([0, 0, 1, 1])
    imp, flips, size = (np.asarray(a) for a in ci.impurity(pred, filt, comp, 2))
    assert flips.tolist() == [[0, 0], [1, 1]] and size.tolist() == [2, 2]
    assert np.allclose(imp, [[0, 0], [math.log(2), math.log(2)]])


# -- ART's shape ------------------------------------------------------------------------------------
def test_detect_poison_is_one_call_with_arts_shape():
    ds = data.synthetic(n_train=600, n_test=100, seed=0)
    cfg = config.preset("fast", {"train.epochs": 1, "train.batch_size": 32, "eval.batch_size": 64,
                                 "defense.name": "ss"})
    t = train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes, train.steps_per_epoch(600, 32))
    report, is_clean = defenses.detect_poison(t, ds.x_train, ds.y_train, ds.num_classes, cfg)
    assert is_clean.shape == (600,) and is_clean.dtype == bool
    assert (~is_clean).sum() == sum(c["removed"] for c in report["classes"])
    assert {c["label"] for c in report["classes"]} == set(range(10))
