"""warp: a small random elastic warp. Each image gets its own smooth displacement field, drawn from
the seed and the image's content: uniform displacements in [-1, 1] on a `grid` x `grid` lattice of
control points, upsampled bilinearly to the image and scaled to at most `pixels` pixels; the image
is resampled there bilinearly (edge pixels extended). Like WaNet's warp, but random per image and
meant to be mild: it moves strokes by a pixel or so, not their shape."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from ci_jax.perturbations.base import InputTransform, Perturbation, image_key
from ci_jax.settings import section, setting

SALT = 0x77617270  # its random stream apart from the noise perturbation's, at the same seed


@section
class Settings:
    pixels: float = setting(1.0, "largest displacement of a pixel, in pixels", low=0.0, high=100.0, low_open=True)
    grid: int = setting(4, "control points per side of the displacement field (fewer: smoother)", low=2, high=64)


def displacement(key: jax.Array, h: int, w: int, pixels: float, grid: int) -> jax.Array:
    """(H, W, 2) row and column displacements, each within [-pixels, pixels]."""
    d_GG2 = jax.random.uniform(key, (grid, grid, 2), jnp.float32, -1.0, 1.0)
    # Linear interpolation is a convex combination: the bound on the lattice holds everywhere.
    return jax.image.resize(d_GG2, (h, w, 2), "linear") * jnp.float32(pixels)


def warp(seed: int, pixels: float, grid: int) -> InputTransform:
    key = jax.random.fold_in(jax.random.key(seed), SALT)

    def warp_one(x_HWC: jax.Array) -> jax.Array:
        h, w, _ = x_HWC.shape
        d_HW2 = displacement(image_key(key, x_HWC), h, w, pixels, grid)
        rows = jnp.arange(h, dtype=jnp.float32)[:, None] + d_HW2[..., 0]
        cols = jnp.arange(w, dtype=jnp.float32)[None, :] + d_HW2[..., 1]
        sample = lambda x_HW: map_coordinates(x_HW, (rows, cols), order=1, mode="nearest")
        return jax.vmap(sample, in_axes=2, out_axes=2)(x_HWC).astype(x_HWC.dtype)
    return jax.vmap(warp_one)


WARP = Perturbation("warp", lambda s, seed: warp(seed, s.pixels, s.grid), Settings=Settings, strength="pixels")
