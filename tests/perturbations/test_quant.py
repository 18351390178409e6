"""quant on hand-built values: binarising at 2 levels, 4 levels by hand, clipping."""

import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import perturbations
from ci_jax.errors import UserError


def _quant(entry, values):
    x = jnp.asarray(np.asarray(values, np.float32).reshape(1, 1, -1, 1))
    return np.asarray(perturbations.make(entry).transform(x)).ravel()


def test_two_levels_binarise():
    np.testing.assert_array_equal(_quant("quant@2", [-0.3, 0.0, 0.2, 0.49, 0.51, 0.9, 1.7]), [0, 0, 0, 0, 1, 1, 1])


def test_four_levels_by_hand():
    # Levels 0, 1/3, 2/3, 1; 0.2 -> 0.6 of a step -> 1/3; 0.45 -> 1.35 -> 1/3; 0.6 -> 1.8 -> 2/3.
    np.testing.assert_allclose(_quant("quant@4", [0.1, 0.2, 0.45, 0.6, 0.95]), [0, 1 / 3, 1 / 3, 2 / 3, 1], rtol=1e-6)


def test_levels_must_be_a_whole_number_in_range():
    with pytest.raises(UserError, match="quant levels: must be from 2 to 256"):
        perturbations.make("quant@1")
    with pytest.raises(UserError, match="must be a whole number"):
        perturbations.make("quant@2.5")
