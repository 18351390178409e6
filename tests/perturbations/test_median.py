"""median3 on hand-built images: it removes strokes one pixel wide and keeps wider ones."""

import jax.numpy as jnp
import numpy as np

from ci_jax import perturbations


def _median3(x):
    return np.asarray(perturbations.make("median3").transform(jnp.asarray(x, jnp.float32)))[0, :, :, 0]


def test_a_line_one_pixel_wide_goes_and_a_line_two_pixels_wide_stays():
    thin = np.zeros((1, 7, 7, 1))
    thin[0, 3, :, 0] = 1.0  # every 3x3 window on the line sees 3 of 9 ones: median 0
    assert not _median3(thin).any()
    thick = np.zeros((1, 8, 7, 1))
    thick[0, 3:5, :, 0] = 1.0  # on the line, 6 of 9 ones inside, 4 of 9 at the ends (zero padding)
    out = _median3(thick)
    expected = np.zeros((8, 7))
    expected[3:5, 1:6] = 1.0
    np.testing.assert_array_equal(out, expected)


def test_a_one_pixel_trigger_goes_and_the_digit_stays():
    x = np.zeros((1, 9, 9, 1))
    x[0, 2:7, 3:6, 0] = 0.8  # a 5x3 stroke
    x[0, 8, 8, 0] = 1.0  # the trigger pixel, in the corner
    out = _median3(x)
    assert out[8, 8] == 0.0
    assert (out[3:6, 4] == np.float32(0.8)).all()
