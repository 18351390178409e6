"""Backdoor data poisoning: stamp a trigger on source-class images and relabel them to the target.

Poisons replace their clean originals in place (the training set keeps its size), so the
ground truth is just a set of indices into the training set. Everything is host-side numpy
and deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Protocol

import numpy as np

from ci_jax.errors import UserError

TRIGGERS: tuple[str, ...] = ("pixel", "patch", "blend", "chessboard")
SELECTIONS: tuple[str, ...] = ("first", "random")
ALL_SOURCES = -1  # source class -1: every class but the target (an all-to-one attack)


class Trigger(Protocol):
    """What every trigger offers: a check against the image shape, and the stamping itself."""

    def validate(self, image_shape: tuple[int, int, int]) -> None: ...
    def apply(self, x_NHWC: np.ndarray) -> np.ndarray: ...


def _check_position(what: str, row: object, col: object, size: int, image_shape) -> None:
    height, width = int(image_shape[0]), int(image_shape[1])
    if not (_is_int(row) and _is_int(col)):
        raise UserError(f"{what} position ({row!r}, {col!r}) must be integer coordinates: "
                        "pass whole numbers for --trigger-row and --trigger-col")
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        extent = "" if size == 1 else f" (its top-left corner, {size}x{size} pixels)"
        raise UserError(f"{what} at ({row}, {col}){extent} is outside the {height}x{width} image: "
                        f"choose row in 0..{height - size} and col in 0..{width - size}")


def _check_strength(what: str, value: object, upper: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{what} {value!r} is not a number")
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "finite and > 0"
        raise UserError(f"{what} {value} must be {bound}")


def _as_float(x_NHWC: np.ndarray) -> np.ndarray:
    x_NHWC = np.asarray(x_NHWC)
    if x_NHWC.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W, C), got shape {x_NHWC.shape}")
    return x_NHWC.astype(np.float32, copy=True)


@dataclasses.dataclass(frozen=True)
class PixelTrigger:
    """The seed attack: add `amplitude` to pixel (row, col) of every channel; images are in [0, 1]."""

    row: int = 18
    col: int = 24
    amplitude: float = 0.25
    clip: bool = False  # no clipping by default, as in the seed notebook

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        """Raise UserError unless this trigger fits an (H, W, C) image and has a usable amplitude."""
        _check_position("trigger pixel", self.row, self.col, 1, image_shape)
        _check_strength("trigger amplitude", self.amplitude)

    def apply(self, x_NHWC: np.ndarray) -> np.ndarray:
        """Return a new float32 array with the trigger stamped on every image; input untouched."""
        out_NHWC = _as_float(x_NHWC)
        self.validate(out_NHWC.shape[1:])
        pixel_NC = out_NHWC[:, self.row, self.col, :] + np.float32(self.amplitude)
        if self.clip:
            # Only the trigger pixel is clipped: the rest of the image must stay bit-identical.
            pixel_NC = np.clip(pixel_NC, 0.0, 1.0)
        out_NHWC[:, self.row, self.col, :] = pixel_NC
        return out_NHWC


@dataclasses.dataclass(frozen=True)
class PatchTrigger:
    """BadNets: a size x size black-and-white checkerboard (1 at its top-left) pasted at (row, col)."""

    row: int = 25
    col: int = 25
    size: int = 3

    def pattern_HW(self) -> np.ndarray:
        i, j = np.indices((self.size, self.size))
        return ((i + j) % 2 == 0).astype(np.float32)

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        if not _is_int(self.size) or self.size < 1:
            raise UserError(f"patch size {self.size!r} must be a whole number >= 1")
        _check_position("trigger patch", self.row, self.col, self.size, image_shape)

    def apply(self, x_NHWC: np.ndarray) -> np.ndarray:
        out_NHWC = _as_float(x_NHWC)
        self.validate(out_NHWC.shape[1:])
        r, c, s = self.row, self.col, self.size
        out_NHWC[:, r:r + s, c:c + s, :] = self.pattern_HW()[None, :, :, None]
        return out_NHWC


@dataclasses.dataclass(frozen=True)
class BlendTrigger:
    """Chen et al. 2017: mix a fixed random image in, x' = (1 - alpha) x + alpha * pattern."""

    alpha: float = 0.2
    seed: int = 0  # the attacker's pattern: fixed by its own seed, not the run's

    def pattern_HWC(self, image_shape: tuple[int, int, int]) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.uniform(0.0, 1.0, tuple(int(d) for d in image_shape)).astype(np.float32)

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        _check_strength("blend alpha", self.alpha, upper=1.0)

    def apply(self, x_NHWC: np.ndarray) -> np.ndarray:
        out_NHWC = _as_float(x_NHWC)
        self.validate(out_NHWC.shape[1:])
        a = np.float32(self.alpha)
        return (1 - a) * out_NHWC + a * self.pattern_HWC(out_NHWC.shape[1:])[None]


@dataclasses.dataclass(frozen=True)
class ChessboardTrigger:
    """A low-amplitude global pattern (Xiang et al.): +delta and -delta on alternating pixels."""

    delta: float = 0.1
    clip: bool = False

    def pattern_HW(self, height: int, width: int) -> np.ndarray:
        i, j = np.indices((height, width))
        return np.where((i + j) % 2 == 0, self.delta, -self.delta).astype(np.float32)

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        _check_strength("chessboard delta", self.delta, upper=1.0)

    def apply(self, x_NHWC: np.ndarray) -> np.ndarray:
        out_NHWC = _as_float(x_NHWC)
        self.validate(out_NHWC.shape[1:])
        out_NHWC += self.pattern_HW(*out_NHWC.shape[1:3])[None, :, :, None]
        return np.clip(out_NHWC, 0.0, 1.0) if self.clip else out_NHWC


def make_trigger(cfg) -> Trigger:
    """The trigger a config names, built from its fields (see config.Config, attack section)."""
    if cfg.trigger == "pixel":
        return PixelTrigger(row=cfg.trigger_row, col=cfg.trigger_col, amplitude=cfg.amplitude, clip=cfg.clip)
    if cfg.trigger == "patch":
        return PatchTrigger(row=cfg.trigger_row, col=cfg.trigger_col, size=cfg.patch_size)
    if cfg.trigger == "blend":
        return BlendTrigger(alpha=cfg.blend_alpha, seed=cfg.trigger_seed)
    if cfg.trigger == "chessboard":
        return ChessboardTrigger(delta=cfg.chess_delta, clip=cfg.clip)
    raise UserError(f"unknown trigger {cfg.trigger!r}: choose one of {', '.join(TRIGGERS)}")


def source_classes(source: int, target: int, num_classes: int) -> list[int]:
    """The classes whose images get the trigger: one, or all but the target for source -1."""
    return [c for c in range(num_classes) if c != target] if source == ALL_SOURCES else [source]


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
    trigger: Trigger,
) -> None:
    """Raise UserError for an attack that cannot be carried out, before any work is done."""
    if not _is_int(target) or not 0 <= target < num_classes:
        raise UserError(f"target class {target!r} is not a class of this dataset: "
                        f"choose one in 0..{num_classes - 1}")
    if not _is_int(source) or not ALL_SOURCES <= source < num_classes:
        raise UserError(f"source class {source!r} is not a class of this dataset: choose one in "
                        f"0..{num_classes - 1}, or {ALL_SOURCES} for all classes but the target")
    if source == target:
        raise UserError(
            f"source and target are both class {source}: choose a target different from the source"
        )
    if not _is_int(n) or n < 0:
        raise UserError(f"number of poisons {n!r} must be a whole number >= 0: fix --n-poison")
    sources = source_classes(source, target, num_classes)
    available = int(np.count_nonzero(np.isin(np.asarray(y_N), sources)))
    if n > available:
        which = f"class {source} has" if len(sources) == 1 else "the source classes have"
        raise UserError(f"asked for {n} poisons but {which} only {available} images: lower --n-poison")
    trigger.validate(image_shape)


def poison_training_set(
    x_NHWC: np.ndarray,
    y_N: np.ndarray,
    *,
    source: int,
    target: int,
    n: int,
    trigger: Trigger,
    selection: str = "first",
    seed: int = 0,
    num_classes: int = 10,
) -> PoisonedSet:
    """Replace n source-class training images by triggered copies labelled `target`.

    selection "first" takes the first n source images in dataset order (as the seed notebook
    does); "random" draws n without replacement with np.random.default_rng(seed). With source
    -1 the candidates are every image not of the target class.
    """
    x_NHWC, y_N = _check_pair(x_NHWC, y_N)
    validate_attack(
        y_N, num_classes, x_NHWC.shape[1:], source=source, target=target, n=n, trigger=trigger
    )
    if selection not in SELECTIONS:
        raise UserError(
            f"unknown poison selection {selection!r}: choose one of {', '.join(SELECTIONS)}"
        )

    source_idx = np.flatnonzero(np.isin(y_N, source_classes(source, target, num_classes))).astype(np.int64)
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
    x_NHWC: np.ndarray, y_N: np.ndarray, *, source: int, trigger: Trigger, target: int = -1,
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Every test image of the source class(es) with the trigger applied, and their indices.

    ASR is measured on these; target is needed only for source -1 (all but the target).
    """
    x_NHWC, y_N = _check_pair(x_NHWC, y_N)
    idx = np.flatnonzero(np.isin(y_N, source_classes(source, target, num_classes)))
    return trigger.apply(x_NHWC[idx]), idx


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
