"""Adaptive-Blend (Qi, Xie, Li, Mahloujifar, Mittal, "Revisiting the Assumption of Latent
Separability for Backdoor Defenses", ICLR 2023): an adaptive attack against defenses that assume
poisons form their own cluster.

The blended trigger T is split into pieces (a 4 x 4 grid); every poison and every cover image
blends a fresh random half of them, x' = x + alpha m (T - x) with m the mask of the chosen pieces,
alpha = 0.15. Poisons are relabelled; covers (the paper's conservatism: regularisation samples)
keep their labels, `cover_ratio` of them per poison (the authors' equal poison and cover rates:
1). At test time the full trigger is blended at alpha 0.2. The authors blend a Hello-Kitty
image; we use a seeded U[0, 1] pattern (Blend's random-pattern variant), so no image file is needed.
"""

from __future__ import annotations

import math

import numpy as np

from ci_jax.attacks.base import Attack
from ci_jax.attacks.blend import random_pattern
from ci_jax.errors import UserError
from ci_jax.settings import section, setting


@section
class Settings:
    pieces: int = setting(16, "pieces the trigger is split into (a square number: a grid)", low=1, high=1024)
    kept: int = setting(8, "pieces blended into each poison and cover image", low=1, high=1024)
    alpha: float = setting(0.15, "blend weight of the trigger in the training images", low=0.0, high=1.0, low_open=True)
    test_alpha: float = setting(0.2, "blend weight of the full trigger at test time", low=0.0, high=1.0, low_open=True)
    cover_ratio: float = setting(1.0, "cover images per poison (the conservatism)", low=0.0, high=100.0)
    pattern_seed: int = setting(0, "seed of the attacker's pattern (not the run's seed)", low=0)

    def check(self) -> None:
        if math.isqrt(self.pieces) ** 2 != self.pieces:
            raise UserError(f"attack.adaptive_blend.pieces = {self.pieces}: must be a square number (a grid of pieces)")
        if self.kept > self.pieces:
            raise UserError(f"attack.adaptive_blend.kept = {self.kept} exceeds its {self.pieces} pieces")


class AdaptiveBlend(Attack):
    Settings = Settings

    def check(self, image_shape):
        side = math.isqrt(self.s.pieces)
        if image_shape[0] % side or image_shape[1] % side:
            raise UserError(f"attack.adaptive_blend.pieces = {self.s.pieces}: a {side}x{side} grid does not "
                            f"divide the {image_shape[0]}x{image_shape[1]} image evenly")

    def n_covers(self, n_poison):
        return int(round(self.s.cover_ratio * n_poison))

    def masks(self, n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """(n, H, W) masks, each of `kept` pieces chosen at random."""
        side = math.isqrt(self.s.pieces)
        chosen = np.argsort(rng.random((n, self.s.pieces)), axis=1)[:, :self.s.kept]
        grid = np.zeros((n, self.s.pieces), np.float32)
        np.put_along_axis(grid, chosen, 1.0, axis=1)
        grid = grid.reshape(n, side, side)
        return np.repeat(np.repeat(grid, height // side, 1), width // side, 2)

    def stamp(self, x_NHWC, rng, test):
        t = random_pattern(self.s.pattern_seed, x_NHWC.shape[1:])[None]
        if test:
            return (x_NHWC + np.float32(self.s.test_alpha) * (t - x_NHWC)).astype(np.float32)
        m = self.masks(len(x_NHWC), *x_NHWC.shape[1:3], rng)[..., None]
        return (x_NHWC + np.float32(self.s.alpha) * m * (t - x_NHWC)).astype(np.float32)

    def cover(self, x_NHWC, rng):
        return self.stamp(x_NHWC, rng, test=False)
