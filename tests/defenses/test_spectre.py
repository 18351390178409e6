"""SPECTRE (ci_jax.defenses.spectre) on planted poisons."""

import numpy as np
import pytest

from ci_jax import defenses
from ci_jax.defenses import spectre

from helpers import PLANT_TARGET, defense_settings, planted_with_reserve, reserve_view

K = 10  # planted_with_reserve's classes


# -- SPECTRE ----------------------------------------------------------------------------------------
def test_spectre_finds_the_planted_poisons_and_removes_one_and_a_half_eps_per_class():
    feats, y, is_poison, _, _ = planted_with_reserve()
    res = defenses.build("spectre", defense_settings("spectre", eps=0.1)).run(reserve_view(feats, y, is_poison))
    removed = ~res.is_clean_N
    assert removed[is_poison].all()
    for c in range(K):
        n = int((y == c).sum())
        assert removed[y == c].sum() == round(1.5 * round(0.1 * n))
    assert res.report["top_class"] == PLANT_TARGET


def test_spectre_toolbox_mode_removes_from_the_target_alone():
    feats, y, is_poison, _, _ = planted_with_reserve()
    view = reserve_view(feats, y, is_poison)
    view.truth = defenses.Truth(poisons=int(is_poison.sum()), target=PLANT_TARGET)
    res = defenses.build("spectre", defense_settings("spectre", mode="toolbox")).run(view)
    removed = ~res.is_clean_N
    assert removed[is_poison].all() and not removed[y != PLANT_TARGET].any()


@pytest.mark.parametrize("n", [2, 5, 12, 40])
def test_spectre_small_classes_give_finite_scores_and_lose_no_more_than_their_share(n):
    feats, y, is_poison, _, _ = planted_with_reserve(n_poison=0)
    keep = np.concatenate([np.flatnonzero(y != 4), np.flatnonzero(y == 4)[:n]])
    feats, y = feats[keep], y[keep]
    settings = defense_settings("spectre", eps=0.1)
    res = defenses.build("spectre", settings).run(reserve_view(feats, y, np.zeros(len(y), bool)))
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
