"""A trigger aimed at CI's own assumption: a smooth, low-frequency additive pattern that CI's mild
filters leave in place (ours; no published attack targets CI).

CI assumes that a mild filter destroys the trigger, so that the poisons' decisions flip under it.
A pattern with no energy at high spatial frequencies passes a 2x2 or 3x3 mean, a 3x3 median and a
small Gaussian almost unchanged: the pattern here is a coarse grid of random values in [-1, 1],
upsampled bilinearly to the image (so it varies over a third of the image or more) and scaled to
`amplitude`. Its poisons keep their decisions under the filter and their component looks pure,
which the benchmark measures (the component's impurity is in report.json).
"""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack, quantise8
from ci_jax.errors import UserError
from ci_jax.settings import section, setting


@section
class Settings:
    amplitude: float = setting(0.15, "largest change of a pixel", low=0.0, high=1.0, low_open=True)
    grid: int = setting(3, "side of the coarse random grid upsampled to the image: small is smooth", low=2, high=64)
    pattern_seed: int = setting(0, "seed of the attacker's pattern (not the run's seed)", low=0)


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation of n_in control points spread over n_out pixels."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(n_in)[None, :]))


def pattern(s: Settings, image_shape: tuple[int, int, int]) -> np.ndarray:
    h, w, c = image_shape
    coarse = np.random.default_rng(s.pattern_seed).uniform(-1.0, 1.0, (s.grid, s.grid, c))
    p = np.einsum("hg,gkc,wk->hwc", _upsample_matrix(s.grid, h), coarse, _upsample_matrix(s.grid, w))
    return (s.amplitude * p / np.abs(p).max()).astype(np.float32)


class Smooth(Attack):
    Settings = Settings

    def check(self, image_shape):
        if self.s.grid > min(image_shape[:2]):
            raise UserError(f"attack.smooth.grid {self.s.grid} is finer than the {image_shape[0]}x"
                            f"{image_shape[1]} image: choose at most {min(image_shape[:2])}")

    def stamp(self, x_NHWC, rng, test):
        return quantise8(x_NHWC + pattern(self.s, x_NHWC.shape[1:])[None])
