"""BppAttack's trigger (Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against
Deep Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022):
colour-depth squeezing, q(x) = round(x (L - 1)) / (L - 1) with L levels per channel, optionally
after Floyd-Steinberg error diffusion (raster order, in 0..255 units, as the authors' code).

The poison-only variant: the paper trains the model itself, adding "negative" samples that keep
their labels; as a data-poisoning attack we only plant quantised, relabelled poisons. Defaults:
L = 8 (the authors' and BackdoorBench's config), no dithering (BackdoorBench's default). We clip the
dithered image to [0, 1], which the authors' code does not.
"""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack
from ci_jax.settings import section, setting


@section
class Settings:
    levels: int = setting(8, "levels kept per channel (8 = 3 bits)", low=2, high=255)
    dither: bool = setting(False, "Floyd-Steinberg error diffusion before squeezing")


def squeeze(x: np.ndarray, levels: int) -> np.ndarray:
    return np.round(x * (levels - 1)) / (levels - 1)


def floyd_steinberg(x_NHWC: np.ndarray, levels: int) -> np.ndarray:
    """Error diffusion over each image, pixel by pixel in raster order, all images at once."""
    img = x_NHWC.astype(np.float64) * 255.0
    n, h, w, c = img.shape
    for y in range(h):
        for x in range(w):
            old = img[:, y, x, :].copy()
            new = squeeze(old / 255.0, levels) * 255.0
            img[:, y, x, :] = new
            err = old - new
            if x + 1 < w:
                img[:, y, x + 1, :] += err * 7 / 16
            if y + 1 < h:
                if x > 0:
                    img[:, y + 1, x - 1, :] += err * 3 / 16
                img[:, y + 1, x, :] += err * 5 / 16
                if x + 1 < w:
                    img[:, y + 1, x + 1, :] += err * 1 / 16
    return np.clip(np.round(img) / 255.0, 0.0, 1.0)


class Bpp(Attack):
    Settings = Settings

    def stamp(self, x_NHWC, rng, test):
        out = floyd_steinberg(x_NHWC, self.s.levels) if self.s.dither else squeeze(x_NHWC, self.s.levels)
        return np.clip(out, 0.0, 1.0).astype(np.float32)
