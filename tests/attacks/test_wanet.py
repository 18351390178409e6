"""WaNet's warping trigger (ci_jax.attacks.wanet)."""

import math

import numpy as np
import pytest

from ci_jax.attacks import wanet
from ci_jax.errors import UserError

from helpers import build_attack, ten_class_images


# -- WaNet ------------------------------------------------------------------------------------------
def test_bicubic_matrix_interpolates_and_keeps_constants():
    m = wanet.bicubic_matrix(4, 28)
    assert np.allclose(m.sum(1), 1.0)
    assert np.allclose(m[0], [1, 0, 0, 0]) and np.allclose(m[-1], [0, 0, 0, 1])  # align_corners
    nodes = np.isclose(np.linspace(0, 3, 28) % 1, 0)  # output pixels that sit on a control point
    assert np.allclose(m[nodes], np.eye(4))
    # Keys' weights with A = -0.75 half-way between points, by hand: 1 - 3.25/8 and 3 - 3.09375.
    assert np.allclose(wanet._cubic(np.array([0.5])), [[-0.09375, 0.59375, 0.59375, -0.09375]])


def test_warp_with_the_identity_grid_is_the_identity_and_a_shift_moves_pixels():
    x, _ = ten_class_images(n=3, side=8)
    a = np.linspace(-1, 1, 8)
    identity = np.stack(np.meshgrid(a, a, indexing="xy"), -1)
    assert np.allclose(wanet.warp(x, np.broadcast_to(identity, (3, 8, 8, 2))), x, atol=1e-6)
    shifted = identity.copy()
    shifted[..., 0] = np.clip(shifted[..., 0] + 2 / 7, -1, 1)  # sample one column to the right
    out = wanet.warp(x, np.broadcast_to(shifted, (3, 8, 8, 2)))
    assert np.allclose(out[:, :, :-1], x[:, :, 1:], atol=1e-6)


def test_wanet_field_is_small_and_fixed_and_covers_are_noisy():
    a = build_attack("wanet", k=4, s=0.5)
    grid = wanet.sampling_grid(a.s, 28)
    lin = np.linspace(-1, 1, 28)
    identity = np.stack(np.meshgrid(lin, lin, indexing="xy"), -1)
    shift = np.abs(grid - identity)
    assert shift.max() > 0 and shift.mean() < 4 * 0.5 / 28
    x, _ = ten_class_images(n=4)
    assert np.array_equal(a.stamp(x, None, test=False), a.stamp(x, None, test=True))
    c1 = a.cover(x, np.random.default_rng(0))
    assert not np.allclose(c1, a.stamp(x, None, test=False))
    assert a.n_covers(100) == 200


def test_wanet_needs_square_images():
    with pytest.raises(UserError, match="square"):
        build_attack("wanet").check((28, 32, 1))
    assert math.isclose(build_attack("wanet").s.s, 0.5)
