"""BppAttack's colour-depth squeezing (ci_jax.attacks.bpp)."""

import numpy as np

from ci_jax.attacks import bpp

from helpers import build_attack


# -- BppAttack --------------------------------------------------------------------------------------
def test_bpp_squeezes_to_levels():
    x = np.array([0.0, 0.1, 0.2, 0.5, 0.93, 1.0], np.float32).reshape(1, 1, 6, 1)
    out = build_attack("bpp", levels=3).stamp(x, None, test=False)
    assert np.allclose(out.ravel(), [0, 0, 0, 0.5, 1, 1])  # x * 2 = 0, .2, .4, 1, 1.86, 2, rounded, halved


def test_floyd_steinberg_diffuses_the_error():
    x = np.full((1, 4, 4, 1), 0.25, np.float32)
    out = bpp.floyd_steinberg(x, 2)
    assert set(np.unique(out)) <= {0.0, 1.0}
    assert abs(out.mean() - 0.25) <= 1 / 16 + 1e-9  # the mean grey survives as a dot pattern
    assert np.isclose(bpp.floyd_steinberg(np.zeros((1, 3, 3, 1), np.float32), 8), 0).all()
