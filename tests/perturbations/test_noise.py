"""noise on hand-built images: bounded, seeded, its own draw per image."""

import jax.numpy as jnp
import numpy as np

from ci_jax import perturbations


def test_noise_at_a_strength_is_bounded_by_it_and_keeps_the_mean():
    x = jnp.full((2, 32, 32, 1), 0.5, jnp.float32)
    x = x.at[1].set(0.25)
    out = np.asarray(perturbations.make("noise@0.05", seed=1).transform(x))
    d = out - np.asarray(x)
    assert np.abs(d).max() <= 0.05 + 1e-7 and np.abs(d).max() > 0.04
    # Uniform on [-0.05, 0.05]: mean 0, sd 0.05 / sqrt(3) ~ 0.029; over 1,024 pixels the mean is within 0.005.
    assert abs(d[0].mean()) < 0.005 and abs(d[0].std() - 0.05 / np.sqrt(3)) < 0.003
    assert not np.allclose(d[0], d[1])  # each image its own draw


def test_the_same_image_gets_the_same_noise_in_any_batch_and_another_seed_other_noise():
    x = jnp.asarray(np.random.default_rng(0).random((3, 6, 6, 1)), jnp.float32)
    f = perturbations.make("noise", seed=2).transform
    np.testing.assert_array_equal(np.asarray(f(x))[1:], np.asarray(f(x[1:])))
    g = perturbations.make("noise", seed=3).transform
    assert not np.array_equal(np.asarray(f(x)), np.asarray(g(x)))
