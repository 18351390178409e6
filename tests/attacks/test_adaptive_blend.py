"""Adaptive-Blend (ci_jax.attacks.adaptive_blend)."""

import numpy as np
import pytest

from ci_jax import config
from ci_jax.errors import UserError

from helpers import build_attack


# -- Adaptive-Blend ---------------------------------------------------------------------------------
def test_adaptive_blend_masks_keep_half_the_pieces():
    a = build_attack("adaptive_blend")
    m = a.masks(50, 28, 28, np.random.default_rng(0))
    assert m.shape == (50, 28, 28) and set(np.unique(m)) == {0.0, 1.0}
    assert np.allclose(m.sum((1, 2)), 8 * 7 * 7)  # 8 pieces of 7x7
    blocks = m.reshape(50, 4, 7, 4, 7)
    assert (blocks.min((2, 4)) == blocks.max((2, 4))).all()  # whole pieces only
    assert len({tuple(row) for row in m.reshape(50, -1)}) > 40  # a fresh choice per image


def test_adaptive_blend_strengths_and_test_trigger():
    a = build_attack("adaptive_blend")
    x = np.zeros((2, 28, 28, 1), np.float32)
    t = a.stamp(x, None, test=True)
    pattern = np.random.default_rng(0).uniform(0, 1, (28, 28, 1)).astype(np.float32)
    assert np.allclose(t[0], 0.2 * pattern)
    tr = a.stamp(x, np.random.default_rng(1), test=False)
    assert np.isclose(tr.max(), 0.15 * pattern.max(), atol=1e-6) and (tr == 0).mean() >= 0.5
    assert a.n_covers(30) == 30


def test_adaptive_blend_rejects_pieces_that_do_not_tile():
    with pytest.raises(UserError, match="square number"):
        config.preset("default", {"attack.name": "adaptive_blend", "attack.adaptive_blend.pieces": 15})
    with pytest.raises(UserError, match="exceeds"):
        config.preset("default", {"attack.name": "adaptive_blend", "attack.adaptive_blend.kept": 20})
    a = build_attack("adaptive_blend", pieces=9, kept=3)
    with pytest.raises(UserError, match="does not divide"):
        a.check((28, 28, 1))
