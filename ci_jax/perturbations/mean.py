"""Mean filters: mean2, the CI authors' 2x2 mean (zero padding at the bottom and right, as their
public notebook), and mean3, a centred 3x3 mean (zero padding)."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp

from ci_jax.perturbations.base import Perturbation, tap_conv


class Mean(Perturbation):
    def __init__(self, size: int, padding: tuple[tuple[int, int], tuple[int, int]]) -> None:
        self.name, self.size, self.padding = f"mean{size}", size, padding

    def build(self, s: Any, seed: int) -> Any:
        k_HW = jnp.full((self.size, self.size), 1.0 / self.size ** 2)
        return functools.partial(tap_conv, k_HW=k_HW, padding=self.padding)


MEAN2 = Mean(2, ((0, 1), (0, 1)))
MEAN3 = Mean(3, ((1, 1), (1, 1)))
