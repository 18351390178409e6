"""The smooth low-frequency trigger aimed at CI (ci_jax.attacks.smooth)."""

import numpy as np

from ci_jax.attacks import smooth

from helpers import build_attack


# -- smooth -----------------------------------------------------------------------------------------
def test_smooth_pattern_is_low_frequency_and_bounded():
    a = build_attack("smooth", amplitude=0.1, grid=3)
    p = smooth.pattern(a.s, (28, 28, 1))
    assert np.isclose(np.abs(p).max(), 0.1)
    assert np.abs(np.diff(p, axis=0)).max() < 0.1 / 5 and np.abs(np.diff(p, axis=1)).max() < 0.1 / 5
