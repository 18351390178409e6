"""Backdoor data poisoning: stamp a trigger on source-class images and relabel them to the target.

Poisons replace their clean originals in place (the training set keeps its size), so the
ground truth is just a set of indices into the training set. Everything is host-side numpy
and deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from ci_jax.errors import UserError

TRIGGERS: tuple[str, ...] = ("pixel",)
SELECTIONS: tuple[str, ...] = ("first", "random")


@dataclasses.dataclass(frozen=True)
class PixelTrigger:
    """The seed attack: add `amplitude` to pixel (row, col) of every channel; images are in [0, 1]."""

    row: int = 18
    col: int = 24
    amplitude: float = 0.25
    clip: bool = False  # no clipping by default, as in the seed notebook

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        """Raise UserError unless this trigger fits an (H, W, C) image and has a usable amplitude."""
        height, width = int(image_shape[0]), int(image_shape[1])
        if not (_is_int(self.row) and _is_int(self.col)):
            raise UserError(
                f"trigger pixel ({self.row!r}, {self.col!r}) must be integer coordinates: "
                "pass whole numbers for row and col"
            )
        if not (0 <= self.row < height and 0 <= self.col < width):
            raise UserError(
                f"trigger pixel ({self.row}, {self.col}) is outside the {height}x{width} image: "
                f"choose row in 0..{height - 1} and col in 0..{width - 1}"
            )
        amplitude = self.amplitude
        if isinstance(amplitude, bool) or not isinstance(amplitude, numbers.Real):
            raise UserError(f"trigger amplitude {amplitude!r} is not a number: pass e.g. 0.25")
        if not math.isfinite(amplitude) or amplitude <= 0:
            raise UserError(
                f"trigger amplitude {amplitude} must be finite and > 0: pass e.g. 0.25"
            )

    def apply(self, x_NHWC: np.ndarray) -> np.ndarray:
        """Return a new float32 array with the trigger stamped on every image; input untouched."""
        x_NHWC = np.asarray(x_NHWC)
        if x_NHWC.ndim != 4:
            raise ValueError(f"expected images shaped (N, H, W, C), got shape {x_NHWC.shape}")
        self.validate(x_NHWC.shape[1:])
        out_NHWC = x_NHWC.astype(np.float32, copy=True)
        pixel_NC = out_NHWC[:, self.row, self.col, :] + np.float32(self.amplitude)
        if self.clip:
            # Only the trigger pixel is clipped: the rest of the image must stay bit-identical.
            pixel_NC = np.clip(pixel_NC, 0.0, 1.0)
        out_NHWC[:, self.row, self.col, :] = pixel_NC
        return out_NHWC


# eq=False: the generated __eq__/__hash__ would compare/hash arrays, which numpy cannot do.
@dataclasses.dataclass(frozen=True, eq=False)
class PoisonedSet:
    x_NHWC: np.ndarray = dataclasses.field(repr=False)  # float32, poisons in place of originals
    y_N: np.ndarray = dataclasses.field(repr=False)  # int32, poisons relabelled to target
    is_poison_N: np.ndarray = dataclasses.field(repr=False)  # bool ground truth
    poison_idx: np.ndarray = dataclasses.field(repr=False)  # int64, sorted

    @property
    def n_poison(self) -> int:
        return int(self.poison_idx.size)


def validate_attack(
    y_N: np.ndarray,
    num_classes: int,
    image_shape: tuple[int, int, int],
    *,
    source: int,
    target: int,
    n: int,
    trigger: PixelTrigger,
) -> None:
    """Raise UserError for an attack that cannot be carried out, before any work is done."""
    for name, value in (("source", source), ("target", target)):
        if not _is_int(value) or not 0 <= value < num_classes:
            raise UserError(
                f"{name} class {value!r} is not a class of this dataset: "
                f"choose one in 0..{num_classes - 1}"
            )
    if source == target:
        raise UserError(
            f"source and target are both class {source}: choose a target different from the source"
        )
    if not _is_int(n) or n < 0:
        raise UserError(f"number of poisons {n!r} must be a whole number >= 0: fix --n-poison")
    available = int(np.count_nonzero(np.asarray(y_N) == source))
    if n > available:
        raise UserError(
            f"asked for {n} poisons but class {source} has only {available} images: "
            "lower --n-poison"
        )
    trigger.validate(image_shape)


def poison_training_set(
    x_NHWC: np.ndarray,
    y_N: np.ndarray,
    *,
    source: int,
    target: int,
    n: int,
    trigger: PixelTrigger,
    selection: str = "first",
    seed: int = 0,
    num_classes: int = 10,
) -> PoisonedSet:
    """Replace n source-class training images by triggered copies labelled `target`.

    selection "first" takes the first n source images in dataset order (as the seed notebook
    does); "random" draws n without replacement with np.random.default_rng(seed).
    """
    x_NHWC, y_N = _check_pair(x_NHWC, y_N)
    validate_attack(
        y_N, num_classes, x_NHWC.shape[1:], source=source, target=target, n=n, trigger=trigger
    )
    if selection not in SELECTIONS:
        raise UserError(
            f"unknown poison selection {selection!r}: choose one of {', '.join(SELECTIONS)}"
        )

    source_idx = np.flatnonzero(y_N == source).astype(np.int64)
    if selection == "first":
        poison_idx = source_idx[:n]
    else:
        rng = np.random.default_rng(seed)
        poison_idx = np.sort(rng.choice(source_idx, size=n, replace=False)).astype(np.int64)

    out_x_NHWC = x_NHWC.astype(np.float32, copy=True)
    out_y_N = y_N.astype(np.int32, copy=True)
    if n > 0:
        out_x_NHWC[poison_idx] = trigger.apply(out_x_NHWC[poison_idx])
        out_y_N[poison_idx] = target
    is_poison_N = np.zeros(len(y_N), dtype=bool)
    is_poison_N[poison_idx] = True
    return PoisonedSet(
        x_NHWC=out_x_NHWC, y_N=out_y_N, is_poison_N=is_poison_N, poison_idx=poison_idx
    )


def triggered_test_set(
    x_NHWC: np.ndarray, y_N: np.ndarray, *, source: int, trigger: PixelTrigger
) -> np.ndarray:
    """Every test image of the source class with the trigger applied (ASR is measured on these)."""
    x_NHWC, y_N = _check_pair(x_NHWC, y_N)
    return trigger.apply(x_NHWC[y_N == source])


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a class index or pixel row is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_pair(x_NHWC: np.ndarray, y_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Mismatched arrays come from our own loaders, not the user: a bug, hence ValueError.
    x_NHWC, y_N = np.asarray(x_NHWC), np.asarray(y_N)
    if x_NHWC.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W, C), got shape {x_NHWC.shape}")
    if y_N.shape != (len(x_NHWC),):
        raise ValueError(f"expected labels shaped ({len(x_NHWC)},), got shape {y_N.shape}")
    return x_NHWC, y_N
