"""Blended injection (Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning", 2017): x' = (1 - alpha) x + alpha p, p a fixed random image.

The paper blends a cartoon (Hello Kitty) or uniform noise; we use seeded uniform noise, its
"random pattern" variant, so that no image file is needed.
"""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack
from ci_jax.settings import section, setting


@section
class Settings:
    alpha: float = setting(0.2, "weight of the pattern in the blend", low=0.0, high=1.0, low_open=True)
    pattern_seed: int = setting(0, "seed of the attacker's random pattern (not the run's seed)", low=0)


def random_pattern(seed: int, image_shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, tuple(image_shape)).astype(np.float32)


class Blend(Attack):
    Settings = Settings

    def stamp(self, x_NHWC, rng, test):
        a = np.float32(self.s.alpha)
        return (1 - a) * x_NHWC + a * random_pattern(self.s.pattern_seed, x_NHWC.shape[1:])[None]
