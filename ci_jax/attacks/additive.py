"""The CI authors' small additive patterns (Xiang, Miller, Kesidis, MLSP 2019, and their attack
code: chessboard and static in github.com/zhenxianglance/RE-paper, src/utils.py (pattern_craft /
add_backdoor); the cross and its position range in their later
github.com/zhenxianglance/2ClassBADetection, attack_utils.py):
x' = round(255 (x + A pattern)) / 255, clipped to [0, 1], with amplitude A = 3/255.

- chessboard: +A on every pixel whose row + column is even (global);
- static: +A on every pixel whose row and column are both even, a grid of stride 2 (global);
- cross: a 5-pixel "+" of +A, its centre drawn once per attack from pattern_seed (rows and
  columns 3 .. side - 4, as the authors draw it), the same for every poisoned image;
- fourpixel: the authors' "4pixel", named in their code but not published: four pixels of +A at
  positions drawn once per attack from pattern_seed (same range as the cross), every channel. Ours.

Deviations: the authors' RE-paper code does not clip (its clamp is not in place); we round and
clip, as their later code does. The patterns are added to every channel.
"""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack, quantise8
from ci_jax.errors import UserError
from ci_jax.settings import section, setting


@section
class Settings:
    amplitude: float = setting(3 / 255, "value added on the pattern's pixels (the authors': 3/255)",
                               low=0.0, high=1.0, low_open=True)
    quantise: bool = setting(True, "round the poisoned image to 8 bits, as a saved image would be")


@section
class PlacedSettings:
    amplitude: float = setting(3 / 255, "value added on the pattern's pixels (the authors': 3/255)",
                               low=0.0, high=1.0, low_open=True)
    quantise: bool = setting(True, "round the poisoned image to 8 bits, as a saved image would be")
    pattern_seed: int = setting(0, "seed of where the pattern sits (drawn once per attack)", low=0)


class Additive(Attack):
    """Base: a fixed 0/1 mask of the image's size times the amplitude, added and quantised."""

    Settings = Settings

    def mask_HW(self, height: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def check(self, image_shape):
        if min(image_shape[:2]) < 7:
            raise UserError(f"attack {type(self).__name__.lower()} needs images of at least 7x7 pixels")

    def stamp(self, x_NHWC, rng, test):
        p = np.float32(self.s.amplitude) * self.mask_HW(*x_NHWC.shape[1:3])[None, :, :, None]
        out = x_NHWC + p
        return quantise8(out) if self.s.quantise else np.clip(out, 0.0, 1.0).astype(np.float32)


class Chessboard(Additive):
    def mask_HW(self, height, width):
        i, j = np.indices((height, width))
        return ((i + j) % 2 == 0).astype(np.float32)


class Static(Additive):
    def mask_HW(self, height, width):
        i, j = np.indices((height, width))
        return ((i % 2 == 0) & (j % 2 == 0)).astype(np.float32)


def _positions(seed: int, height: int, width: int, n: int) -> np.ndarray:
    """n (row, col) pairs, drawn in rows and columns 3 .. side - 4 (the authors' range)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(3, height - 3, n)
    cols = rng.integers(3, width - 3, n)
    return np.stack([rows, cols], 1)


class Cross(Additive):
    Settings = PlacedSettings

    def mask_HW(self, height, width):
        (r, c), = _positions(self.s.pattern_seed, height, width, 1)
        m = np.zeros((height, width), np.float32)
        m[r, c - 1:c + 2] = 1.0
        m[r - 1:r + 2, c] = 1.0
        return m


class FourPixel(Additive):
    Settings = PlacedSettings

    def mask_HW(self, height, width):
        m = np.zeros((height, width), np.float32)
        seed = self.s.pattern_seed
        while True:  # four distinct pixels
            pos = _positions(seed, height, width, 4)
            if len({tuple(p) for p in pos}) == 4:
                break
            seed += 1 << 20
        m[pos[:, 0], pos[:, 1]] = 1.0
        return m
