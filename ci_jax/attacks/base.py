"""What every attack is: a seeded image transform (the trigger), which training images it poisons,
which cover images it adds, and how its triggered test set is built.

Poisons replace their clean originals in place (the training set keeps its size), so the ground
truth is a set of indices into the training set:
- `is_poison`: the images the attacker plants to teach the backdoor. A label-flipping attack takes
  them from the source class(es) and relabels them to the target; a clean-label attack takes them
  from the target class and keeps their label.
- `is_cover`: triggered images that keep their true label (WaNet's noise mode, Adaptive-Blend's
  conservatism), drawn from the other images. They teach the model *not* to answer a partial or
  noisy trigger, and they are no poisons: detection's TPR counts poisons only.
Everything is host-side numpy and deterministic given the run's seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from ci_jax.errors import UserError

ALL_SOURCES = -1  # source class -1: every class but the target (an all-to-one attack)
SELECTIONS: tuple[str, ...] = ("first", "random")
# Streams of the run's seed: each random choice draws from its own, so adding covers to an attack
# never changes which images are poisoned.
_SELECT, _STAMP, _COVER_SELECT, _COVER_STAMP = range(4)


@dataclasses.dataclass(frozen=True)
class Target:
    """The attack's common settings (config section `attack`, apart from its name)."""

    source: int
    target: int
    n_poison: int
    selection: str
    seed: int


class Attack:
    """Base class. A subclass sets `Settings` (a settings section, or None) and `stamp`.

    clean_label: poisons are drawn from the target class and keep their label.
    poisons: False for the no-attack baseline, which plants nothing.
    """

    Settings: ClassVar[type | None] = None
    clean_label: ClassVar[bool] = False
    poisons: ClassVar[bool] = True

    def __init__(self, settings: Any, target: Target) -> None:
        self.s, self.t = settings, target

    # -- what a subclass defines ----------------------------------------------------------------
    def check(self, image_shape: tuple[int, int, int]) -> None:
        """UserError unless the trigger fits images of this (H, W, C) shape."""

    def stamp(self, x_NHWC: np.ndarray, rng: np.random.Generator, test: bool) -> np.ndarray:
        """The triggered copies of float32 images in [0, 1]; `test`: for the ASR test set (some
        attacks stamp the test set differently, e.g. a stronger SIG or the full Adaptive-Blend)."""
        raise NotImplementedError

    def n_covers(self, n_poison: int) -> int:
        return 0

    def cover(self, x_NHWC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Cover images: triggered (or partly triggered) copies that keep their true label."""
        return self.stamp(x_NHWC, rng, test=False)

    # -- shared ---------------------------------------------------------------------------------
    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.t.seed, stream])

    def source_classes(self, num_classes: int) -> list[int]:
        """The classes whose images the trigger is meant for: at test time, every non-target
        class for a clean-label or all-to-one attack, else the source."""
        if self.clean_label or self.t.source == ALL_SOURCES:
            return [c for c in range(num_classes) if c != self.t.target]
        return [self.t.source]

    def poison_classes(self, num_classes: int) -> list[int]:
        return [self.t.target] if self.clean_label else self.source_classes(num_classes)

    def describe_asr(self, num_classes: int) -> str:
        classes = self.source_classes(num_classes)
        if len(classes) == 1:
            return f"test images of class {classes[0]}, triggered"
        return f"every test image not of the target class {self.t.target}, triggered"


@dataclasses.dataclass(frozen=True, eq=False)
class PoisonedSet:
    x_NHWC: np.ndarray = dataclasses.field(repr=False)  # float32; poisons and covers in place
    y_N: np.ndarray = dataclasses.field(repr=False)  # int32; label-flipped poisons carry the target
    is_poison_N: np.ndarray = dataclasses.field(repr=False)  # bool
    is_cover_N: np.ndarray = dataclasses.field(repr=False)  # bool, disjoint from is_poison_N

    @property
    def poison_idx(self) -> np.ndarray:
        return np.flatnonzero(self.is_poison_N)

    @property
    def n_poison(self) -> int:
        return int(np.count_nonzero(self.is_poison_N))

    @property
    def n_cover(self) -> int:
        return int(np.count_nonzero(self.is_cover_N))


@dataclasses.dataclass(frozen=True, eq=False)
class TriggeredTest:
    """The images ASR is measured on: triggered test images of the classes the attack applies to."""

    x_NHWC: np.ndarray = dataclasses.field(repr=False)
    idx: np.ndarray = dataclasses.field(repr=False)  # their indices in the test split
    description: str


def validate(attack: Attack, y_N: np.ndarray, num_classes: int, image_shape: tuple[int, int, int]) -> None:
    """UserError for an attack that cannot be carried out on this data, before any work."""
    t = attack.t
    if not 0 <= t.target < num_classes:
        raise UserError(f"attack.target {t.target} is not a class of this dataset: choose one in 0..{num_classes - 1}")
    if not ALL_SOURCES <= t.source < num_classes:
        raise UserError(f"attack.source {t.source} is not a class of this dataset: choose one in "
                        f"0..{num_classes - 1}, or {ALL_SOURCES} for every class but the target")
    if not attack.poisons:
        return
    classes = attack.poison_classes(num_classes)
    available = int(np.count_nonzero(np.isin(np.asarray(y_N), classes)))
    if t.n_poison > available:
        which = f"class {classes[0]} has" if len(classes) == 1 else "the source classes have"
        raise UserError(f"asked for {t.n_poison} poisons but {which} only {available} training "
                        "images: lower --attack.n_poison")
    n_cover = attack.n_covers(t.n_poison)
    # Covers come from the images of every class but the target that are not poisons.
    free = int(np.count_nonzero(np.asarray(y_N) != t.target)) - (0 if attack.clean_label else t.n_poison)
    if n_cover > free:
        raise UserError(f"{n_cover} cover images do not fit beside {t.n_poison} poisons in the {free} "
                        f"training images left outside the target class: lower the attack's cover ratio "
                        "or --attack.n_poison")
    attack.check(tuple(int(d) for d in image_shape))


def _select(candidates: np.ndarray, n: int, selection: str, rng: np.random.Generator) -> np.ndarray:
    if selection == "first":
        return candidates[:n]
    return np.sort(rng.choice(candidates, size=n, replace=False)).astype(np.int64)


def poison_training_set(attack: Attack, x_NHWC: np.ndarray, y_N: np.ndarray, num_classes: int) -> PoisonedSet:
    """The poisoned training set: `attack.t.n_poison` poisons (the first ones in dataset order, as
    the seed notebook does, or drawn with the seed), then the attack's covers drawn at random from
    the remaining images of every class but the target, triggered and keeping their labels."""
    x_NHWC, y_N = _check_pair(x_NHWC, y_N)
    validate(attack, y_N, num_classes, x_NHWC.shape[1:])
    out_x = x_NHWC.astype(np.float32, copy=True)
    out_y = y_N.astype(np.int32, copy=True)
    is_poison = np.zeros(len(y_N), bool)
    is_cover = np.zeros(len(y_N), bool)
    n = attack.t.n_poison if attack.poisons else 0
    if n:
        candidates = np.flatnonzero(np.isin(y_N, attack.poison_classes(num_classes))).astype(np.int64)
        idx = _select(candidates, n, attack.t.selection, attack.rng(_SELECT))
        out_x[idx] = _checked(attack, attack.stamp(out_x[idx], attack.rng(_STAMP), test=False), out_x[idx])
        if not attack.clean_label:
            out_y[idx] = attack.t.target
        is_poison[idx] = True
        n_cover = attack.n_covers(n)
        if n_cover:
            free = np.flatnonzero(~is_poison & (y_N != attack.t.target))
            cover_idx = np.sort(attack.rng(_COVER_SELECT).choice(free, size=n_cover, replace=False))
            covers = attack.cover(out_x[cover_idx], attack.rng(_COVER_STAMP))
            out_x[cover_idx] = _checked(attack, covers, out_x[cover_idx])
            is_cover[cover_idx] = True
    return PoisonedSet(out_x, out_y, is_poison, is_cover)


def triggered_test_set(attack: Attack, x_NHWC: np.ndarray, y_N: np.ndarray, num_classes: int) -> TriggeredTest:
    """Every test image of the classes the attack applies to, triggered (none for no attack)."""
    x_NHWC, y_N = _check_pair(x_NHWC, y_N)
    if not attack.poisons:
        return TriggeredTest(x_NHWC[:0].astype(np.float32), np.zeros(0, np.int64), "no attack: none")
    attack.check(tuple(int(d) for d in x_NHWC.shape[1:]))  # a UserError, not an IndexError in stamp
    idx = np.flatnonzero(np.isin(y_N, attack.source_classes(num_classes))).astype(np.int64)
    clean = x_NHWC[idx].astype(np.float32)
    x = _checked(attack, attack.stamp(clean, attack.rng(_STAMP), test=True), clean)
    return TriggeredTest(x, idx, attack.describe_asr(num_classes))


def _checked(attack: Attack, x_NHWC: np.ndarray, like: np.ndarray) -> np.ndarray:
    # A trigger that made NaN or changed the shape or type is a bug in the attack, not a user mistake.
    name = type(attack).__name__
    if x_NHWC.shape != like.shape or x_NHWC.dtype != np.float32:
        raise ValueError(f"{name}.stamp returned {x_NHWC.dtype} {x_NHWC.shape} for float32 {like.shape}")
    if not np.isfinite(x_NHWC).all():
        raise ValueError(f"{name}.stamp returned non-finite values")
    return x_NHWC


def _check_pair(x_NHWC: np.ndarray, y_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Mismatched arrays come from our own loaders, not the user: a bug, hence ValueError.
    x_NHWC, y_N = np.asarray(x_NHWC), np.asarray(y_N)
    if x_NHWC.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W, C), got shape {x_NHWC.shape}")
    if y_N.shape != (len(x_NHWC),):
        raise ValueError(f"expected labels shaped ({len(x_NHWC)},), got shape {y_N.shape}")
    return x_NHWC, y_N


def check_position(what: str, row: int, col: int, size: int, image_shape: tuple[int, int, int],
                   flag: str) -> None:
    """UserError unless a size x size square with its top-left corner at (row, col) fits."""
    height, width = image_shape[0], image_shape[1]
    if size > min(height, width):
        raise UserError(f"{what} of {size}x{size} pixels is larger than the {height}x{width} image: "
                        f"choose a size of at most {min(height, width)}")
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        extent = "" if size == 1 else f" (its top-left corner, {size}x{size} pixels)"
        raise UserError(f"{what} at ({row}, {col}){extent} is outside the {height}x{width} image: "
                        f"choose {flag}.row in 0..{height - size} and {flag}.col in 0..{width - size}")


def quantise8(x_NHWC: np.ndarray) -> np.ndarray:
    """Rounded to the 256 levels of an 8-bit image, as a saved PNG would be."""
    return (np.round(np.clip(x_NHWC, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)
