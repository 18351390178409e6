"""gaussian on hand-built images, and its severity ladder."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import perturbations
from ci_jax.defenses.ci import Settings as CISettings


def _apply(entry, x, values=None):
    return np.asarray(perturbations.make(entry, values).transform(jnp.asarray(x, jnp.float32)))[0, :, :, 0]


def test_the_impulse_response_at_sigma_half_is_the_3x3_outer_product_by_hand():
    x = np.zeros((1, 7, 7, 1))
    x[0, 3, 3, 0] = 1.0
    out = _apply("gaussian@0.5", x)
    g = np.array([math.exp(-2.0), 1.0, math.exp(-2.0)])  # exp(-t^2 / (2 * 0.25)), t = -1, 0, 1: radius 1
    g /= g.sum()
    expected = np.zeros((7, 7))
    expected[2:5, 2:5] = np.outer(g, g)
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert out[3, 3] == pytest.approx(1 / (1 + 2 * math.exp(-2.0)) ** 2, rel=1e-6)


def test_a_strength_overrides_the_defense_field_and_names_its_pass():
    ci = CISettings(gaussian_sigma=0.5)
    assert perturbations.describe("gaussian", ci) == "gaussian(sigma=0.5)"
    assert perturbations.describe("gaussian@2", ci) == "gaussian(sigma=2.0)"
    assert [a.name for a in perturbations.ladder("gaussian", [0.5, 1, 2])] == [
        "gaussian(sigma=0.5)", "gaussian(sigma=1.0)", "gaussian(sigma=2.0)"]
    # A wider blur spreads the impulse further: its centre keeps less.
    x = np.zeros((1, 15, 15, 1))
    x[0, 7, 7, 0] = 1.0
    centres = [_apply(f"gaussian@{s}", x)[7, 7] for s in (0.5, 1.0, 2.0)]
    assert centres[0] > centres[1] > centres[2]
