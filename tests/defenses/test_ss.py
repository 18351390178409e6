"""Spectral Signatures (ci_jax.defenses.ss)."""

import numpy as np

from ci_jax import defenses
from ci_jax.defenses import ss

from helpers import (N_PLANT, PLANT_TARGET, clean_features, defense_settings, planted_features,
                     planted_with_reserve, reserve_view, run_defense)

PER_CLASS = 400  # clean_features' images per class


def test_ss_removes_one_and_a_half_eps_of_every_class_even_when_clean():
    feats_ND, y_N = clean_features()
    res = run_defense("ss", feats_ND, y_N, **{"defense.ss.eps": 0.1})
    for c in range(3):
        assert np.count_nonzero(~res.is_clean_N[y_N == c]) == int(1.5 * 0.1 * PER_CLASS)
    # Scores are scaled by each class's cut-off: removed iff score >= 1.
    np.testing.assert_array_equal(~res.is_clean_N, res.score_N >= 1.0)


def test_ss_projects_centred_features():
    rng = np.random.default_rng(0)
    # Far from the origin, the uncentred top direction is the mean; the spread is along axis 1.
    feats_ND = np.array([100.0, 0.0]) + rng.normal(0, 1, (500, 2)) * np.array([0.1, 3.0])
    s_N = ss.scores(feats_ND)
    centred_ND = feats_ND - feats_ND.mean(0)
    np.testing.assert_allclose(s_N, centred_ND[:, 1] ** 2, rtol=0.05, atol=0.05)


def test_ss_report_counts_removed_poisons_per_class():
    feats_ND, y_N, is_poison_N = planted_features()
    res = run_defense("ss", feats_ND, y_N, is_poison_N)
    target = next(c for c in res.report["classes"] if c["label"] == PLANT_TARGET)
    assert target == {"label": PLANT_TARGET, "size": PER_CLASS + N_PLANT,
                      "removed": int(1.5 * 0.1 * (PER_CLASS + N_PLANT)),
                      "poisons": N_PLANT, "removed_poisons": N_PLANT}


def test_ss_removes_one_and_a_half_eps_despite_rounding():
    # 1.5 x 0.3 x 100 is 44.999... in floating point: 45 images are meant.
    feats, y, is_poison, _, _ = planted_with_reserve(n_per_class=100, n_poison=0)
    res = defenses.build("ss", defense_settings("ss", eps=0.3)).run(reserve_view(feats, y, is_poison))
    assert all(c["removed"] == 45 for c in res.report["classes"])
