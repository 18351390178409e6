"""The CI defense's image filters (ci_jax.perturbations), hand-computed on tiny images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import perturbations
from ci_jax.defenses.ci import Settings as Params  # the filters' parameters are CI's fields
from ci_jax.errors import UserError
from ci_jax.perturbations import gaussian

FILTERS = ("mean2", "mean3", "median3", "gaussian", "noise", "quant")  # CI's filters before the perturbations


def _make(name, params=Params(), seed=0):
    return perturbations.make(name, params, seed).transform


def _img(h, w, c=1, pixels=()):
    x = np.zeros((1, h, w, c), np.float32)
    for (i, j, ch, v) in pixels:
        x[0, i, j, ch] = v
    return x


def _apply(name, x, params=Params(), seed=0):
    return np.asarray(_make(name, params, seed)(jnp.asarray(x)))


def test_mean2_single_bright_pixel():
    x = _img(3, 3, pixels=[(1, 1, 0, 1.0)])
    out = _apply("mean2", x)
    expected = np.zeros((3, 3), np.float32)
    expected[0:2, 0:2] = 0.25
    assert out.shape == x.shape
    np.testing.assert_allclose(out[0, :, :, 0], expected, atol=1e-7)


def test_mean2_is_the_same_size_2x2_mean_with_zero_pad_bottom_right():
    x = np.random.default_rng(0).random((1, 3, 3, 1)).astype(np.float32)
    xp = np.pad(x[0, :, :, 0], ((0, 1), (0, 1)))
    expected = np.array([[xp[i:i + 2, j:j + 2].mean() for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(_apply("mean2", x)[0, :, :, 0], expected, rtol=1e-6, atol=1e-6)


def test_mean3_hand_computed():
    x = _img(5, 5, pixels=[(2, 2, 0, 9.0), (0, 0, 0, 9.0)])
    out = _apply("mean3", x)[0, :, :, 0]
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] += 1.0   # centre pixel spreads 9/9 over its 3x3 neighbourhood
    expected[0:2, 0:2] += 1.0   # corner pixel: zero padding, spreads over the 2x2 inside
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_median3_removes_an_isolated_bright_pixel_and_keeps_a_block():
    x = _img(7, 7, pixels=[(1, 5, 0, 1.0)])
    x[0, 2:5, 1:4, 0] = 0.5  # a 3x3 block
    out = _apply("median3", x)[0, :, :, 0]
    assert out[1, 5] == 0.0
    assert out[3, 2] == 0.5  # the block's centre survives (9 of 9 taps are 0.5)
    # The block's corners see 4 of 9 taps at 0.5 -> median 0; its edges see 6 of 9 -> 0.5.
    assert out[2, 1] == 0.0 and out[2, 2] == 0.5
    expected = np.zeros((7, 7), np.float32)
    expected[2:5, 2] = 0.5
    expected[3, 1:4] = 0.5
    np.testing.assert_array_equal(out, expected)


def test_median3_is_the_median_of_the_9_taps():
    x = np.random.default_rng(3).random((2, 6, 5, 2)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = np.stack([xp[:, i:i + 6, j:j + 5] for i in range(3) for j in range(3)])
    np.testing.assert_array_equal(_apply("median3", x), np.median(taps, axis=0))


def test_gaussian_preserves_a_constant_interior_and_sums_to_one():
    x = np.full((1, 16, 16, 1), 0.7, np.float32)
    for sigma in (0.5, 1.0, 1.5):
        out = _apply("gaussian", x, Params(gaussian_sigma=sigma))
        r = max(1, math.ceil(2 * sigma))
        assert gaussian.radius(sigma) == r
        np.testing.assert_allclose(out[0, r:-r, r:-r, 0], 0.7, rtol=1e-5)
        assert out[0, 0, 0, 0] < 0.7  # zero padding darkens the border
    # Its kernel, the response to a unit impulse: 5x5 for sigma 1, sums to 1, symmetric, peaked.
    impulse = _img(9, 9, pixels=[(4, 4, 0, 1.0)])
    k = _apply("gaussian", impulse, Params(gaussian_sigma=1.0))[0, :, :, 0]
    assert np.count_nonzero(k > 1e-9) == 25 and (k[2:7, 2:7] > 0).all()
    assert k.sum() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(k, k.T, rtol=1e-6, atol=1e-8)
    assert k[4, 4] == k.max()
    g = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    np.testing.assert_allclose(k[2:7, 2:7], np.outer(g, g) / np.outer(g, g).sum(), rtol=1e-5)


def test_gaussian_wider_than_the_image_is_a_user_error():
    perturbations.check("gaussian", Params(gaussian_sigma=6.5), (28, 28, 1))  # radius 13: 27 pixels wide
    with pytest.raises(UserError, match=r"gaussian_sigma 6.51: its kernel \(29 pixels wide\) is wider than the "
                                        r"28-pixel image: choose a sigma of at most 6.5$"):
        perturbations.check("gaussian", Params(gaussian_sigma=6.51), (28, 28, 1))
    with pytest.raises(UserError, match="at most 7.5$"):  # the largest it suggests is accepted
        perturbations.check("gaussian", Params(gaussian_sigma=7.6), (32, 32, 3))
    perturbations.check("gaussian", Params(gaussian_sigma=7.5), (32, 32, 3))
    perturbations.check("median3", Params(gaussian_sigma=100.0), (28, 28, 1))  # only the gaussian has a sigma


def test_noise_is_deterministic_and_bounded():
    x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 3)), jnp.float32)
    for half_width in (0.1, 0.05):
        f = _make("noise", Params(noise_width=half_width), seed=3)
        a, b = np.asarray(f(x)), np.asarray(f(x))
        np.testing.assert_array_equal(a, b)
        d = a - np.asarray(x)
        assert np.abs(d).max() <= half_width + 1e-6
        assert np.abs(d).max() > half_width / 2  # it does add noise
        assert not np.allclose(d[0], d[1])  # each image gets its own noise
    # Same input, same seed, fresh filter -> same output; another seed -> other noise.
    np.testing.assert_array_equal(_apply("noise", x, seed=3), _apply("noise", x, seed=3))
    assert not np.array_equal(_apply("noise", x, seed=3), _apply("noise", x, seed=4))


def test_noise_does_not_depend_on_the_batch():
    x = jnp.asarray(np.random.default_rng(1).random((4, 8, 8, 1)), jnp.float32)
    f = _make("noise", Params(), seed=0)
    np.testing.assert_array_equal(np.asarray(f(x))[2:], np.asarray(f(x[2:])))


def test_quant_rounds_to_evenly_spaced_levels():
    x = np.array([0.0, 0.2, 0.3, 0.74, 0.76, 1.2, -0.1], np.float32).reshape(1, 1, 7, 1)
    out = _apply("quant", x, Params(quant_levels=3))[0, 0, :, 0]
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.0])
    x8 = np.random.default_rng(2).random((1, 4, 4, 1)).astype(np.float32)
    assert len(np.unique(_apply("quant", x8, Params(quant_levels=8)))) <= 8


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3)])
def test_every_filter_keeps_the_shape_and_dtype(name, shape):
    x = jnp.asarray(np.random.default_rng(0).random(shape), jnp.float32)
    out = _make(name)(x)
    assert out.shape == shape
    assert out.dtype == x.dtype
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", FILTERS)
def test_every_filter_runs_under_jit_as_predict_applies_it(name):
    x = jnp.asarray(np.random.default_rng(0).random((3, 8, 8, 1)), jnp.float32)
    f = _make(name, Params(), seed=1)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(f(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mean2", "mean3", "median3", "gaussian", "quant"])
def test_channels_are_filtered_independently(name):
    rng = np.random.default_rng(1)
    x = _img(6, 6, c=3)
    x[0, :, :, 1] = rng.random((6, 6))
    f = _make(name)
    out = np.asarray(f(jnp.asarray(x)))
    assert (out[..., 0] == 0).all() and (out[..., 2] == 0).all()
    alone = np.asarray(f(jnp.asarray(x[..., 1:2])))
    np.testing.assert_allclose(out[..., 1:2], alone, rtol=1e-6, atol=1e-7)


def test_describe_names_the_parameter_each_filter_uses():
    p = Params(gaussian_sigma=0.5, noise_width=0.3, quant_levels=4)
    assert [perturbations.describe(f, p) for f in FILTERS] == [
        "mean2", "mean3", "median3", "gaussian(sigma=0.5)", "noise(width=0.3)", "quant(levels=4)"]


def test_unknown_filter_raises():
    with pytest.raises(ValueError, match="blur"):
        _make("blur")
