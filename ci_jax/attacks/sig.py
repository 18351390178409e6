"""SIG (Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019): a clean-label attack. Images of the target class get a horizontal
sinusoid v(i, j) = delta sin(2 pi j f / W), added to every row and channel and clipped to [0, 1],
and keep their label; the model learns the sinusoid as a feature of the target class. At test time
the sinusoid (delta x test_gain: the paper strengthens it at test time) is added to every
non-target image.

Defaults: delta = 20/255 and f = 6 (the paper's MNIST setting, as backdoor-toolbox and BackdoorBench
use f = 6 with delta 30/255 and 40/255 on CIFAR-10); test_gain 1, as both toolboxes.
"""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack
from ci_jax.settings import section, setting


@section
class Settings:
    delta: float = setting(20 / 255, "amplitude of the sinusoid", low=0.0, high=1.0, low_open=True)
    frequency: float = setting(6.0, "cycles of the sinusoid across the image's width", low=0.0, high=64.0, low_open=True)
    test_gain: float = setting(1.0, "test-time amplitude = delta x test_gain", low=0.0, high=50.0, low_open=True)


def sinusoid_W(width: int, delta: float, frequency: float) -> np.ndarray:
    j = np.arange(width)
    return (delta * np.sin(2 * np.pi * j * frequency / width)).astype(np.float32)


class SIG(Attack):
    Settings = Settings
    clean_label = True

    def stamp(self, x_NHWC, rng, test):
        delta = self.s.delta * (self.s.test_gain if test else 1.0)
        v = sinusoid_W(x_NHWC.shape[2], delta, self.s.frequency)[None, None, :, None]
        return np.clip(x_NHWC + v, 0.0, 1.0).astype(np.float32)
