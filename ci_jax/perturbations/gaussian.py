"""gaussian: a Gaussian blur of `sigma` pixels (radius ceil(2 sigma), zero padding), separable."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ci_jax.perturbations.base import Perturbation, tap_conv
from ci_jax.settings import section, setting


@section
class Settings:
    sigma: float = setting(1.0, "its sigma in pixels", low=0.0, low_open=True)


def radius(sigma: float) -> int:
    return max(1, int(math.ceil(2 * sigma)))


def blur(x_BHWC: jax.Array, sigma: float) -> jax.Array:
    # A row pass then a column pass: 2 (2r + 1) taps instead of (2r + 1)^2.
    r = radius(sigma)
    t = np.arange(-r, r + 1)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    g = jnp.asarray(g / g.sum(), jnp.float32)
    x = tap_conv(x_BHWC, g[None, :], ((0, 0), (r, r)))
    return tap_conv(x, g[:, None], ((r, r), (0, 0)))


class Gaussian(Perturbation):
    name = "gaussian"
    Settings = Settings
    strength = "sigma"

    def build(self, s: Settings, seed: int) -> Any:
        return functools.partial(blur, sigma=s.sigma)

    def problem(self, s: Settings, image_shape: tuple[int, int, int]) -> str | None:
        r, side = radius(s.sigma), min(image_shape[:2])
        if 2 * r + 1 <= side:
            return None
        # radius ceil(2 sigma) <= (side - 1) // 2
        return (f"its kernel ({2 * r + 1} pixels wide) is wider than the {side}-pixel image: "
                f"choose a sigma of at most {(side - 1) // 2 / 2:g}")


GAUSSIAN = Gaussian()
