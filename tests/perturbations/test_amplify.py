"""amplify (SCALE-UP's pixel amplification) on hand-built values."""

import jax.numpy as jnp
import numpy as np

from ci_jax import perturbations


def _amplify(entry, values):
    x = jnp.asarray(np.asarray(values, np.float32).reshape(1, 1, -1, 1))
    return np.asarray(perturbations.make(entry).transform(x)).ravel()


def test_pixels_are_multiplied_and_clipped_to_the_valid_range():
    np.testing.assert_allclose(_amplify("amplify@3", [0.0, 0.1, 0.3, 0.5, 1.0]), [0.0, 0.3, 0.9, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(_amplify("amplify@1", [0.0, 0.25, 1.0]), [0.0, 0.25, 1.0])  # scale 1: the image
    assert perturbations.describe("amplify") == "amplify(factor=3.0)"


def test_a_saturated_trigger_survives_every_scale_and_faint_content_saturates():
    x = [1.0, 0.05]  # a trigger pixel at 1, a faint stroke
    for k in (2, 5, 11):
        out = _amplify(f"amplify@{k}", x)
        assert out[0] == 1.0 and out[1] == np.float32(min(1.0, 0.05 * k))
