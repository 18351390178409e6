"""dropout at inference on the features, on a hand-built model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ci_jax import perturbations
from ci_jax.errors import UserError
from ci_jax.perturbations import dropout


class Head(nnx.Module):
    """features = the image's 4 channel means; logits = head(features), a kernel set by hand."""

    def __init__(self):
        self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
        self.head.kernel[...] = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
        self.head.bias[...] = jnp.asarray([0.5, -0.5])

    def __call__(self, x_BHWC):
        feats_BD = x_BHWC.mean((1, 2))
        return self.head(feats_BD), feats_BD


def test_dropped_features_no_longer_count_and_the_kept_ones_count_more():
    gd, st = nnx.split(Head())
    rate, seed = 0.5, 3
    keep = np.asarray(dropout.kept_D(seed, 4, rate))
    assert set(np.unique(keep)) <= {0.0, 2.0}
    out = perturbations.make(f"dropout@{rate}", seed=seed).model(gd, st)
    f = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    logits = np.asarray(nnx.merge(gd, out)(jnp.asarray(f.reshape(1, 1, 1, 4)))[0][0])
    w = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(logits, (f * keep) @ w + [0.5, -0.5], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(st["head"]["kernel"][...]), w)  # the original stays


def test_masks_are_seeded_and_nested_along_the_ladder():
    low, high = (np.asarray(dropout.kept_D(0, 64, r)) for r in (0.2, 0.5))
    assert set(np.flatnonzero(low == 0)) <= set(np.flatnonzero(high == 0))
    assert 0 < np.count_nonzero(low == 0) < np.count_nonzero(high == 0) < 64
    np.testing.assert_array_equal(np.asarray(dropout.kept_D(0, 64, 0.2)), low)
    assert not np.array_equal(np.asarray(dropout.kept_D(1, 64, 0.2)), low)


def test_a_model_without_a_head_is_a_user_error():
    class NoHead(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    with pytest.raises(UserError, match="final linear layer `head`"):
        perturbations.make("dropout").model(*nnx.split(NoHead()))
