"""STRIP (ci_jax.defenses.strip) with a stand-in model."""

import math

import numpy as np

from ci_jax import defenses
from ci_jax.defenses.base import Reserve

from helpers import PLANT_TARGET, defense_settings, reserve_view

K = 10  # reserve_view's classes


# -- STRIP ------------------------------------------------------------------------------------------
def _strip_model(x_NHWC, transform=None, desc=None, logits=False):
    """A stand-in model: a corner pixel of 1 or more (the trigger, which survives any blend) gives a
    confident class PLANT_TARGET; otherwise the logits vary with the image, so entropy is high."""
    x = np.asarray(transform(x_NHWC) if transform is not None else x_NHWC)
    flat = x.reshape(len(x), -1)
    out = np.sin(flat[:, :K] * 7.0 + np.arange(K)) * 0.5
    trig = flat[:, 0] >= 1.0
    out[trig] = -10.0
    out[trig, PLANT_TARGET] = 10.0
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
    view = reserve_view(np.zeros((300, 4), np.float32), y, is_poison, reserve, predict=_strip_model, x=x)
    res = defenses.build("strip", defense_settings("strip", blends=8)).run(view)
    removed = ~res.is_clean_N
    assert removed[is_poison].all() and removed[~is_poison].mean() <= 0.05
    assert res.report["blend_images"] == 8 and res.report["clean_images_for_cut_off"] == 200


def test_strip_with_clean_entropies_all_alike_uses_their_quantile():
    # A model whose softmax is uniform for everything: every entropy is log K, sd 0, no normal fits.
    flat = lambda x, transform=None, desc=None, logits=False: (
        np.zeros(len(x), np.int32), np.zeros((len(x), 4)), np.zeros((len(x), K))) if logits else None
    rng = np.random.default_rng(0)
    x, rx = rng.uniform(0, 1, (50, 2, 2, 1)).astype(np.float32), rng.uniform(0, 1, (40, 2, 2, 1)).astype(np.float32)
    y, ry = (np.arange(50) % K).astype(np.int32), (np.arange(40) % K).astype(np.int32)
    view = reserve_view(np.zeros((50, 4), np.float32), y, np.zeros(50, bool),
                        Reserve(rx, ry, np.zeros((40, 4)), ry.copy(), np.arange(40)), predict=flat, x=x)
    res = defenses.build("strip", defense_settings("strip", blends=4)).run(view)
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
    view = lambda: reserve_view(np.zeros((50, 4), np.float32), y, np.zeros(50, bool),
                                Reserve(rx, ry, np.zeros((104, 4)), ry.copy(), np.arange(104)), predict=model, x=x)
    res = defenses.build("strip", defense_settings("strip", blends=4)).run(view())
    assert res.report["cut_off_entropy"] < 0 and res.is_clean_N.all()
    assert "nothing can be removed" in res.report["note"] and "threshold: empirical" in res.report["note"]
    res = defenses.build("strip", defense_settings("strip", blends=4, threshold="empirical")).run(view())
    assert res.report["cut_off_entropy"] == 0.0 and res.is_clean_N.all()
    assert "entropy 0 under every blend" in res.report["note"] and "threshold: empirical" not in res.report["note"]


def test_strip_entropy_of_a_uniform_softmax_is_log_k():
    assert np.allclose(defenses.strip.entropy_N(np.zeros((3, K))), math.log(K))
