"""warp (a small random elastic warp) on hand-built images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import perturbations
from ci_jax.errors import UserError
from ci_jax.perturbations import warp


def test_the_displacement_is_smooth_and_within_its_bound():
    d = np.asarray(warp.displacement(jax.random.key(5), 16, 16, 1.5, 4))
    assert d.shape == (16, 16, 2) and np.abs(d).max() <= 1.5 + 1e-6 and np.abs(d).max() > 0.3
    # Bilinear between 4 control points a side: neighbours differ by at most the lattice's largest step
    # (2 * 1.5) over the 16 / 4 pixels between control points.
    assert np.abs(np.diff(d, axis=0)).max() <= 3.0 / 4 + 1e-6


def test_a_constant_image_stays_and_a_ramp_moves_by_at_most_the_displacement():
    const = jnp.full((1, 12, 12, 1), 0.4, jnp.float32)
    np.testing.assert_allclose(np.asarray(perturbations.make("warp", seed=0).transform(const)), 0.4, rtol=1e-6)
    # Bilinear resampling is exact on a linear ramp: value j / 16 at column j moves to (j + dx) / 16.
    cols = np.tile(np.arange(16, dtype=np.float32) / 16, (16, 1))
    ramp = jnp.asarray(np.stack([cols, cols.T], -1)[None])  # channel 0 a column ramp, channel 1 a row ramp
    out = np.asarray(perturbations.make("warp@1", seed=0).transform(ramp))[0]
    inner = (slice(2, -2), slice(2, -2))
    moved = (out - np.asarray(ramp)[0])[inner] * 16  # the displacement in pixels, column then row
    assert np.abs(moved).max() <= 1.0 + 1e-4 and np.abs(moved).max() > 0.2


def test_each_image_its_own_warp_the_same_in_any_batch():
    x = jnp.asarray(np.random.default_rng(0).random((3, 10, 10, 1)), jnp.float32)
    f = perturbations.make("warp", seed=1).transform
    out = np.asarray(f(x))
    np.testing.assert_allclose(out[1:], np.asarray(f(x[1:])), rtol=1e-6, atol=1e-7)
    assert not np.allclose(out, np.asarray(x))
    assert not np.allclose(np.asarray(perturbations.make("warp", seed=2).transform(x)), out)


def test_warp_settings_are_checked():
    with pytest.raises(UserError, match="warp pixels: must be > 0.0"):
        perturbations.make("warp@0")
