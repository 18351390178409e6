"""SCAn (ci_jax.defenses.scan) on planted poisons, and the reserve it needs."""

import numpy as np
import pytest

from ci_jax import config, defenses
from ci_jax.defenses import scan
from ci_jax.defenses.base import Reserve
from ci_jax.errors import UserError

from helpers import PLANT_TARGET, defense_settings, planted_with_reserve, reserve_view


# -- SCAn -------------------------------------------------------------------------------------------
def test_scan_flags_only_the_target_class_and_removes_its_poisons():
    feats, y, is_poison, rf, ry = planted_with_reserve()
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    res = defenses.build("scan", defense_settings("scan")).run(reserve_view(feats, y, is_poison, reserve))
    flagged = [c["label"] for c in res.report["classes"] if c["flagged"]]
    assert flagged == [PLANT_TARGET]
    removed = ~res.is_clean_N
    assert removed[is_poison].mean() >= 0.95 and removed[~is_poison].mean() <= 0.01


def test_scan_on_clean_features_flags_nothing():
    feats, y, is_poison, rf, ry = planted_with_reserve(n_poison=0)
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    res = defenses.build("scan", defense_settings("scan")).run(reserve_view(feats, y, is_poison, reserve))
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
    feats, y, is_poison, rf, ry = planted_with_reserve(n_poison=0)
    feats[y == 3] = rf[ry == 3] = feats[y == 3][0]  # every image of class 3 alike: no second subgroup
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    res = defenses.build("scan", defense_settings("scan")).run(reserve_view(feats, y, is_poison, reserve))
    assert np.isfinite(res.score_N).all() and (res.score_N[y == 3] == 0).all() and res.is_clean_N[y == 3].all()


def test_scan_and_strip_need_a_reserve():
    for name in ("scan", "strip"):
        with pytest.raises(UserError, match="--eval.reserve"):
            config.preset("default", {"defense.name": name})
    feats, y, is_poison, _, _ = planted_with_reserve()
    with pytest.raises(UserError, match="--eval.reserve"):
        defenses.build("scan", defense_settings("scan")).run(reserve_view(feats, y, is_poison))
