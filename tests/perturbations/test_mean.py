"""mean2 and mean3 on hand-built images."""

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import perturbations
from ci_jax.errors import UserError


def _apply(entry, x):
    return np.asarray(perturbations.make(entry).transform(jnp.asarray(x, jnp.float32)))


def test_mean2_averages_each_pixel_with_its_right_and_lower_neighbours():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    # Zero padding at the bottom and right: (1+2+3+4)/4, (2+4)/4, (3+4)/4, 4/4.
    np.testing.assert_allclose(_apply("mean2", x)[0, :, :, 0], [[2.5, 1.5], [1.75, 1.0]], rtol=1e-6)


def test_mean3_of_a_3x3_block():
    x = np.zeros((1, 5, 5, 1))
    x[0, 1:4, 1:4, 0] = 1.0
    out = _apply("mean3", x)[0, :, :, 0]
    assert out[2, 2] == pytest.approx(1.0)  # all 9 taps inside the block
    assert out[1, 1] == pytest.approx(4 / 9)  # the block's corner: 4 of its 9 taps
    assert out[1, 2] == pytest.approx(6 / 9)  # the block's edge
    assert out[0, 0] == pytest.approx(1 / 9)  # the image's corner: one tap, (1, 1), in the block
    assert out.sum() == pytest.approx(9.0)  # zero padding loses nothing: the block is inside


def test_mean_filters_take_no_strength():
    with pytest.raises(UserError, match="mean3 takes no strength"):
        perturbations.make("mean3@2")
    assert perturbations.get("mean2").Settings is None and perturbations.describe("mean2") == "mean2"
