"""The seed attack: a single bright pixel (Xiang, Miller, Kesidis, MLSP 2019's MNIST setting as
the public notebook runs it: +0.25 at (18, 24), no clipping)."""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack, check_position
from ci_jax.settings import section, setting


@section
class Settings:
    row: int = setting(18, "row of the trigger pixel", low=0)
    col: int = setting(24, "column of the trigger pixel", low=0)
    amplitude: float = setting(0.25, "value added to the pixel, every channel", low=0.0, low_open=True)
    clip: bool = setting(False, "clip the trigger pixel to [0, 1] (the seed does not)")


class Pixel(Attack):
    Settings = Settings

    def check(self, image_shape):
        check_position("trigger pixel", self.s.row, self.s.col, 1, image_shape, "--attack.pixel")

    def stamp(self, x_NHWC, rng, test):
        out = x_NHWC.copy()
        value = out[:, self.s.row, self.s.col, :] + np.float32(self.s.amplitude)
        # Only the trigger pixel is clipped: the rest of the image stays bit-identical.
        out[:, self.s.row, self.s.col, :] = np.clip(value, 0.0, 1.0) if self.s.clip else value
        return out
