"""BadNets (Gu, Dolan-Gavitt, Garg, 2017): a small black-and-white checkerboard pasted over a
corner of the image."""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack, check_position
from ci_jax.settings import section, setting


@section
class Settings:
    row: int = setting(24, "row of the patch's top-left corner", low=0)
    col: int = setting(24, "column of the patch's top-left corner", low=0)
    size: int = setting(3, "side of the square checkerboard, in pixels", low=1)


class Patch(Attack):
    Settings = Settings

    def pattern_HW(self) -> np.ndarray:
        i, j = np.indices((self.s.size, self.s.size))
        return ((i + j) % 2 == 0).astype(np.float32)  # 1 at its top-left

    def check(self, image_shape):
        check_position("trigger patch", self.s.row, self.s.col, self.s.size, image_shape, "--attack.patch")

    def stamp(self, x_NHWC, rng, test):
        out = x_NHWC.copy()
        r, c, s = self.s.row, self.s.col, self.s.size
        out[:, r:r + s, c:c + s, :] = self.pattern_HW()[None, :, :, None]
        return out
