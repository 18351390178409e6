"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021): the
trigger is a fixed, smooth warping of the image.

The field, as the authors' code draws it: a k x k x 2 grid of U[-1, 1] displacements, scaled to a
mean absolute value of 1, upsampled bicubically (align_corners, Keys' cubic with A = -0.75, as
torch) to the image; the sampling grid is clip((identity + s field / H) x grid_rescale, -1, 1),
and the image is resampled bilinearly on it (align_corners). Noise mode: cover images are warped
with the field plus fresh U[-1, 1] / H noise per image and keep their labels, `cover_ratio` of
them per poison (the authors' cross_ratio = 2).

Deviation: the paper controls training (its poisons are made per batch, with augmentation); this
is its data-poisoning form, as backdoor-toolbox runs it: fixed poisons and covers in the training
set. Square images only, as the authors' code.
"""

from __future__ import annotations

import numpy as np

from ci_jax.attacks.base import Attack
from ci_jax.errors import UserError
from ci_jax.settings import section, setting


@section
class Settings:
    k: int = setting(4, "side of the random control grid of the warping field", low=2, high=64)
    s: float = setting(0.5, "strength of the warp", low=0.0, high=10.0, low_open=True)
    grid_rescale: float = setting(1.0, "scale of the sampling grid (the authors' grid_rescale)", low=0.5, high=1.0)
    cover_ratio: float = setting(2.0, "noise-mode cover images per poison (the authors' cross_ratio)", low=0.0, high=100.0)
    field_seed: int = setting(0, "seed of the attacker's warping field (not the run's seed)", low=0)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 from floor(src)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's bicubic upsampling with align_corners=True."""
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    i0 = np.floor(src).astype(int)
    w = _cubic(src - i0)
    m = np.zeros((n_out, n_in))
    for tap in range(4):
        np.add.at(m, (np.arange(n_out), np.clip(i0 - 1 + tap, 0, n_in - 1)), w[:, tap])
    return m


def sampling_grid(s: Settings, size: int) -> np.ndarray:
    """(H, W, 2) sampling coordinates in [-1, 1]: [..., 0] the column, [..., 1] the row."""
    ins = np.random.default_rng(s.field_seed).uniform(-1.0, 1.0, (2, s.k, s.k))
    ins = ins / np.abs(ins).mean()
    up = bicubic_matrix(s.k, size)
    field = np.einsum("hk,ckl,wl->hwc", up, ins, up)
    a = np.linspace(-1.0, 1.0, size)
    identity = np.stack(np.meshgrid(a, a, indexing="xy"), -1)  # [..., 0] varies along columns
    return np.clip((identity + s.s * field / size) * s.grid_rescale, -1.0, 1.0)


def warp(x_NHWC: np.ndarray, grid_NHW2: np.ndarray) -> np.ndarray:
    """Bilinear resampling of each image at its grid (align_corners=True, zeros outside)."""
    n, h, w, c = x_NHWC.shape
    ix = (grid_NHW2[..., 0] + 1) / 2 * (w - 1)
    iy = (grid_NHW2[..., 1] + 1) / 2 * (h - 1)
    x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
    out = np.zeros_like(x_NHWC, dtype=np.float64)
    batch = np.arange(n)[:, None, None]
    for dy in (0, 1):
        for dx in (0, 1):
            xs, ys = x0 + dx, y0 + dy
            wgt = (1 - np.abs(ix - xs)) * (1 - np.abs(iy - ys))
            inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
            vals = x_NHWC[batch, np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)]
            out += (wgt * inside)[..., None] * vals
    return out.astype(np.float32)


class WaNet(Attack):
    Settings = Settings

    def check(self, image_shape):
        if image_shape[0] != image_shape[1]:
            raise UserError(f"attack wanet needs square images, not {image_shape[0]}x{image_shape[1]}")

    def n_covers(self, n_poison):
        return int(round(self.s.cover_ratio * n_poison))

    def stamp(self, x_NHWC, rng, test):
        grid = sampling_grid(self.s, x_NHWC.shape[1])
        return warp(x_NHWC, np.broadcast_to(grid, (len(x_NHWC), *grid.shape)))

    def cover(self, x_NHWC, rng):
        size = x_NHWC.shape[1]
        grid = sampling_grid(self.s, size)[None] + rng.uniform(-1.0, 1.0, (len(x_NHWC), size, size, 2)) / size
        return warp(x_NHWC, np.clip(grid, -1.0, 1.0))
