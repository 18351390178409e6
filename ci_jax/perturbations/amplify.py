"""amplify: every pixel multiplied by `factor` and clipped to the images' range [0, 1], SCALE-UP's
pixel-wise amplification (Guo et al., ICLR 2023)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ci_jax.perturbations.base import Perturbation
from ci_jax.settings import section, setting


@section
class Settings:
    factor: float = setting(3.0, "factor every pixel is multiplied by before clipping to [0, 1]", low=0.0,
                            high=1e6, low_open=True)


def amplify(x_BHWC: jax.Array, factor: float) -> jax.Array:
    return jnp.clip(x_BHWC * jnp.float32(factor), 0.0, 1.0)


AMPLIFY = Perturbation("amplify", lambda s, seed: functools.partial(amplify, factor=s.factor),
                       Settings=Settings, strength="factor")
