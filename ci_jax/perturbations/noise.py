"""noise: uniform noise in [-width, width] added to every pixel, drawn per image from the seed and
the image's own content (unclipped, as the CI authors' noise)."""

from __future__ import annotations


import jax

from ci_jax.perturbations.base import InputTransform, Perturbation, image_key
from ci_jax.settings import section, setting


@section
class Settings:
    width: float = setting(0.1, "half-width of the uniform noise added", low=0.0, high=1.0, low_open=True)


def add_noise(seed: int, half_width: float) -> InputTransform:
    key = jax.random.key(seed)

    def noise_one(x_HWC: jax.Array) -> jax.Array:
        k = image_key(key, x_HWC)
        return x_HWC + jax.random.uniform(k, x_HWC.shape, x_HWC.dtype, -half_width, half_width)
    return jax.vmap(noise_one)


NOISE = Perturbation("noise", lambda s, seed: add_noise(seed, s.width), Settings=Settings, strength="width")
