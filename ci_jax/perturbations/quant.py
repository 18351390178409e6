"""quant: colour-depth reduction, every value (clipped to [0, 1]) to the nearest of `levels` evenly
spaced levels of [0, 1]; 2 levels binarise the image."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ci_jax.perturbations.base import Perturbation
from ci_jax.settings import section, setting


@section
class Settings:
    levels: int = setting(8, "grey levels kept (colour-depth reduction)", low=2, high=256)


def quantise(x_BHWC: jax.Array, levels: int) -> jax.Array:
    top = jnp.float32(levels - 1)
    return jnp.round(jnp.clip(x_BHWC, 0.0, 1.0) * top) / top


QUANT = Perturbation("quant", lambda s, seed: functools.partial(quantise, levels=s.levels),
                     Settings=Settings, strength="levels")
