"""Image filters: the mild transforms whose effect on a model's decisions CI measures.

Each filter maps a batch x_BHWC to a batch of the same shape, image by image (nothing is reduced
over the batch, so results do not depend on how images are batched or sharded). Linear filters
run as shifted multiply-adds (`tap_conv`), which XLA fuses into one elementwise loop on every
backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ci_jax.errors import UserError

FILTERS: tuple[str, ...] = ("mean2", "mean3", "median3", "gaussian", "noise", "quant")
Filter = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Params:
    """The parameters of the filters that have one."""

    gaussian_sigma: float = 1.0
    noise_width: float = 0.1
    quant_levels: int = 8


def tap_conv(x_BHWC: jax.Array, k_HW: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The same 2-D kernel on every channel, stride 1, as a sum of shifted copies of x."""
    kh, kw = k_HW.shape
    xp = jnp.pad(x_BHWC, ((0, 0), padding[0], padding[1], (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + xp[:, i:i + h, j:j + w, :] * k_HW[i, j].astype(x_BHWC.dtype)
    return out


def _median3(x_BHWC: jax.Array) -> jax.Array:
    h, w = x_BHWC.shape[1:3]
    xp = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    t = [xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]
    # Median of 9 by a min/max exchange network (Paeth / Devillard, 19 exchanges): elementwise ops
    # that XLA fuses into one loop, several times faster than sorting the 9 taps.
    for a, b in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
                 (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)):
        t[a], t[b] = jnp.minimum(t[a], t[b]), jnp.maximum(t[a], t[b])
    return t[4]


def gaussian_radius(sigma: float) -> int:
    return max(1, int(math.ceil(2 * sigma)))


def _gaussian(x_BHWC: jax.Array, sigma: float) -> jax.Array:
    # Separable: a row pass then a column pass, 2 (2r + 1) taps instead of (2r + 1)^2.
    r = gaussian_radius(sigma)
    t = np.arange(-r, r + 1)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    g = jnp.asarray(g / g.sum(), jnp.float32)
    x = tap_conv(x_BHWC, g[None, :], ((0, 0), (r, r)))
    return tap_conv(x, g[:, None], ((r, r), (0, 0)))


def _noise(seed: int, half_width: float) -> Filter:
    key = jax.random.key(seed)

    def noise_one(x_HWC: jax.Array) -> jax.Array:
        # Keyed by the image's own content: reproducible, independent of how images are batched,
        # and with no reduction across the devices that hold a batch.
        k = jax.random.fold_in(key, jax.lax.bitcast_convert_type(jnp.sum(x_HWC), jnp.uint32))
        return x_HWC + jax.random.uniform(k, x_HWC.shape, x_HWC.dtype, -half_width, half_width)
    return jax.vmap(noise_one)


def _quant(x_BHWC: jax.Array, levels: int) -> jax.Array:
    # Colour-depth reduction: every value to the nearest of `levels` evenly spaced levels of [0, 1].
    top = jnp.float32(levels - 1)
    return jnp.round(jnp.clip(x_BHWC, 0.0, 1.0) * top) / top


def make(name: str, params: Params = Params(), seed: int = 0) -> Filter:
    """The filter `name` (one of FILTERS) with its parameters."""
    if name == "mean2":  # the authors' filter: 2x2 mean, zero pad bottom/right
        return functools.partial(tap_conv, k_HW=jnp.full((2, 2), 0.25), padding=((0, 1), (0, 1)))
    if name == "mean3":
        return functools.partial(tap_conv, k_HW=jnp.full((3, 3), 1 / 9), padding=((1, 1), (1, 1)))
    if name == "median3":
        return _median3
    if name == "gaussian":
        return functools.partial(_gaussian, sigma=params.gaussian_sigma)
    if name == "noise":
        return _noise(seed, params.noise_width)
    if name == "quant":
        return functools.partial(_quant, levels=params.quant_levels)
    raise ValueError(f"unknown filter {name!r}")  # the config's choices name them earlier


def describe(name: str, params: Params) -> str:
    """The filter and the parameter it uses, e.g. 'gaussian(sigma=1.0)': names its cached pass."""
    arg = {"gaussian": f"sigma={params.gaussian_sigma}", "noise": f"width={params.noise_width}",
           "quant": f"levels={params.quant_levels}"}.get(name)
    return f"{name}({arg})" if arg else name


def check(name: str, params: Params, image_shape: tuple[int, int, int]) -> None:
    """UserError for a filter that does not fit the images: a Gaussian wider than the image."""
    if name == "gaussian":
        r, side = gaussian_radius(params.gaussian_sigma), min(image_shape[:2])
        if 2 * r + 1 > side:
            raise UserError(f"defense.ci.gaussian_sigma {params.gaussian_sigma}: its kernel "
                            f"({2 * r + 1} pixels wide) is wider than the {side}-pixel image: "
                            f"choose a sigma of at most {(side - 1) // 2 / 2:g}")  # radius ceil(2 sigma) <= (side - 1) // 2
