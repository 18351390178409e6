"""SCALE-UP on a hand-built model whose answer is known: a trigger pixel decides class 1 whatever the
amplification; without it the decision is 0 while the content's intensity stays below 0.32, so
clean images flip once amplified enough."""

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import config, defenses
from ci_jax.defenses import scale_up
from ci_jax.defenses.base import Reserve, View
from ci_jax.errors import UserError


def _images(values, trigger):
    x = np.zeros((len(values), 4, 4, 1), np.float32)
    x[:, 1:, :, 0] = np.asarray(values, np.float32)[:, None, None]  # the content: rows 1-3 at v
    x[:, 0, 0, 0] = np.where(trigger, 1.0, 0.0)
    return x


def _decide(x_NHWC):
    x = np.asarray(x_NHWC)
    return np.where(x[:, 0, 0, 0] > 0.9, 1, np.where(x[:, 1:].mean((1, 2, 3)) < 0.32, 0, 2)).astype(np.int32)


def _predict(x_NHWC, transform=None, desc=None):
    x = np.asarray(transform(jnp.asarray(x_NHWC))) if transform is not None else x_NHWC
    return _decide(x), np.zeros((len(x), 1), np.float32)


def _view(tmp_path=None):
    # Training: 10 clean images at v = 0.05 (SPC 6/11: scales 1..6 keep k * 0.05 < 0.32), 10 at v = 0.1 (3/11:
    # scales 1..3), 4 poisons (SPC 11/11: the trigger pixel stays 1).
    v = np.array([0.05] * 10 + [0.1] * 10 + [0.05] * 4)
    trig = np.arange(24) >= 20
    x = _images(v, trig)
    y = _decide(x)
    rv = np.array([0.05] * 20 + [0.1] * 20)
    rx = _images(rv, np.zeros(40, bool))
    reserve = Reserve(rx, np.zeros(40, np.int64), np.zeros((40, 1)), _decide(rx), np.arange(40), key="r40")
    return View(x_NHWC=x, y_N=y, feats_ND=np.zeros((24, 1)), pred_N=_decide(x), num_classes=3, predict=_predict,
                seed=0, reserve=reserve, cache_dir=tmp_path, key="base", is_poison_N=trig)


def _run(view, **fields):
    cfg = config.replace(config.Config(), {"defense.name": "scale_up", "eval.reserve": 40,
                                           **{f"defense.scale_up.{k}": v for k, v in fields.items()}})
    return defenses.build("scale_up", cfg.defense_settings()).run(view)


def test_data_free_spc_by_hand():
    res = _run(_view(), normalise="none")
    expected = np.array([6 / 11] * 10 + [3 / 11] * 10 + [1.0] * 4)
    np.testing.assert_allclose(res.score_N, expected)
    assert (~res.is_clean_N).tolist() == [True] * 10 + [False] * 10 + [True] * 4  # SPC >= 0.5: 6/11 too
    assert res.report["consistent_scales_counts"] == {**{str(j): 0 for j in range(12)}, "6": 10, "3": 10, "11": 4}


def test_data_limited_standardises_by_the_clean_reserve_by_hand():
    res = _run(_view())
    clean = np.array([6 / 11] * 20 + [3 / 11] * 20)
    mu, sd = clean.mean(), clean.std(ddof=1)  # 4.5/11 and (1.5/11) sqrt(40/39)
    assert mu == pytest.approx(4.5 / 11) and sd == pytest.approx(1.5 / 11 * np.sqrt(40 / 39))
    spc = np.array([6 / 11] * 10 + [3 / 11] * 10 + [1.0] * 4)
    np.testing.assert_allclose(res.score_N, (spc - mu) / sd)
    # T = 0.5: the more consistent half of the clean images is above it too (z = sqrt(39/40) ~ 0.99).
    assert (~res.is_clean_N).sum() == 14 and res.report["clean_flagged_share"] == 0.5
    assert res.report["cut_off"] == 0.5 and res.report["clean_spc_mean"] == pytest.approx(mu)


def test_the_frr_cut_flags_only_what_no_clean_image_reaches():
    res = _run(_view(), cut="frr", frr=0.01)
    assert (~res.is_clean_N).tolist() == [False] * 20 + [True] * 4
    assert res.report["clean_flagged_share"] == 0.0


def test_class_normalisation_falls_back_for_a_decision_without_clean_images():
    res = _run(_view(), normalise="class")
    per = res.report["per_decision"]
    assert per["0"]["clean_images"] == 40 and per["0"]["mean"] == pytest.approx(4.5 / 11)
    assert per["1"] == {"clean_images": 0, "mean": None, "sd": None}  # the poisons' decision: global
    np.testing.assert_allclose(res.score_N, _run(_view()).score_N)  # here the same as global


def test_each_scale_is_its_own_cached_pass(tmp_path):
    _run(_view(tmp_path), min_scale=3, max_scale=7, scale_step=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["pass-amplify_factor=3.0_.npz", "pass-amplify_factor=5.0_.npz", "pass-amplify_factor=7.0_.npz",
                     "pass-r40-amplify_factor=3.0_.npz", "pass-r40-amplify_factor=5.0_.npz",
                     "pass-r40-amplify_factor=7.0_.npz"]
    res = _run(_view(tmp_path), min_scale=3, max_scale=7, scale_step=2, normalise="none")
    assert res.report["scales"] == [3, 5, 7]
    # v = 0.05 keeps scales 3 and 5 (0.25 < 0.32), not 7 (0.35); v = 0.1 keeps 3 (0.3), not 5 (0.5).
    np.testing.assert_allclose(res.score_N[:10], 2 / 3)
    np.testing.assert_allclose(res.score_N[10:20], 1 / 3)


def test_settings_are_checked():
    with pytest.raises(UserError, match="min_scale 5 is above max_scale 3"):
        config.replace(config.Config(), {"defense.scale_up.min_scale": 5, "defense.scale_up.max_scale": 3})
    with pytest.raises(UserError, match="needs clean images held out"):
        config.replace(config.Config(), {"defense.name": "scale_up"})
    assert scale_up.Settings().scales() == list(range(1, 12))
