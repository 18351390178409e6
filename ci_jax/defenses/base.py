"""What every defense is: it receives a view of the trained baseline and returns which training
images it keeps.

A defense is a `Defense` subclass with its own `Settings` section, registered by name in
`ci_jax/defenses/__init__.py`. It runs, caches and times its own extra passes through
`View.train_pass`, and may draw its own figures (`plot`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ci_jax import cache
from ci_jax.errors import UserError

# (images, transform or None) -> (decisions, penultimate features)
Predict = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True, eq=False)
class Reserve:
    """Clean images held out of the test split for the defenses that need some (SCAn, STRIP):
    never used to measure accuracy or ASR."""

    x_NHWC: np.ndarray
    y_N: np.ndarray
    feats_ND: np.ndarray
    pred_N: np.ndarray
    idx: np.ndarray  # their indices in the test split
    key: str = ""  # names which images they are, for the caches of the defenses that use them


@dataclasses.dataclass(frozen=True)
class Truth:
    """What the attack did, for the reference modes that assume they know it (oracle modes, e.g.
    backdoor-toolbox's SS budget of 1.5 x the true poison count): nothing else may read it."""

    poisons: int  # the number of poisoned training images (0: no attack)
    target: int | None  # the class the backdoor leads to; None without poisons


@dataclasses.dataclass(eq=False)
class View:
    """The trained baseline as a defense sees it."""

    x_NHWC: np.ndarray  # the training images as trained on
    y_N: np.ndarray  # their labels as trained on (poisons relabelled)
    feats_ND: np.ndarray  # penultimate features of every training image
    pred_N: np.ndarray  # the baseline's decisions on them
    num_classes: int
    predict: Predict
    seed: int
    reserve: Reserve | None = None
    cache_dir: Path | None = None  # where a defense may keep what it computed; None: no caching
    read_dirs: tuple[Path, ...] = ()  # caches also read, never written (a borrowed baseline's)
    key: str = ""  # identifies the baseline and its passes: every cache key starts with it
    is_poison_N: np.ndarray | None = None  # ground truth, only to count poisons in reports
    truth: Truth | None = None  # the attack's poison count and target, only for oracle modes
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    bn_layers: int | None = None  # the baseline's BatchNorm layers (IBD-PSC scales the last ones); None: unknown

    def cache_paths(self, name: str) -> list[Path]:
        """Where the cache `name` is looked for, the first where it is kept (see `cache.npz`)."""
        if self.cache_dir is None:
            return []
        return [d / name for d in (self.cache_dir, *self.read_dirs)]

    def cached(self, name: str, compute: Callable[[], dict[str, np.ndarray]],
               fits: Callable[[dict[str, np.ndarray]], bool] | None = None) -> dict[str, np.ndarray]:
        """Arrays a defense computed from this baseline, once per baseline and `name` (which must
        say everything they depend on), kept in NAME.npz."""
        return cache.npz(self.cache_paths(f"{_slug(name)}.npz"), f"{self.key}/{name}", compute, fits)

    def train_pass(self, name: str, transform: Callable | None = None, model: Callable | None = None,
                   logits: bool = False) -> np.ndarray:
        """The baseline's decisions on every training image through `transform` (an input
        perturbation) and/or by the model that `model` makes of it ((graphdef, state) -> state, a
        model perturbation), computed once per baseline and `name` (which must say everything that
        defines the pass), kept in pass-NAME.npz and timed as timings_s["pass NAME"] when computed.
        logits: the logits_NK instead, kept in logits-NAME.npz."""
        return self._pass(name, name, self.x_NHWC, transform, model, logits)

    def reserve_pass(self, name: str, transform: Callable | None = None, model: Callable | None = None,
                     logits: bool = False) -> np.ndarray:
        """`train_pass` on the reserve's images, kept in pass-RESERVE-NAME.npz (logits-...)."""
        if self.reserve is None:
            raise ValueError("reserve_pass needs a reserve: check need_reserve first")
        return self._pass(f"{self.reserve.key or 'reserve'}-{name}", f"reserve {name}", self.reserve.x_NHWC,
                          transform, model, logits)

    def _pass(self, cache_name: str, desc: str, x_NHWC: np.ndarray, transform: Callable | None,
              model: Callable | None, logits: bool) -> np.ndarray:
        n, what = len(x_NHWC), "logits" if logits else "pred"
        # Only what is asked for is passed on: a predict that knows no model perturbation still runs the others.
        kwargs = {"model": model} if model is not None else {}
        kwargs |= {"logits": True} if logits else {}

        def compute() -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            out = self.predict(x_NHWC, transform, desc=desc, **kwargs)
            self.timings_s[f"pass {desc}"] = time.perf_counter() - t0
            return {what: out[2] if logits else out[0]}

        if logits:
            fits = lambda a: a[what].shape == (n, self.num_classes) and bool(np.isfinite(a[what]).all())
        else:
            fits = lambda a: a[what].shape == (n,) and _in_classes(a[what], self.num_classes)
        return self.cached(f"{'logits' if logits else 'pass'}-{cache_name}", compute, fits)[what]

    def need_reserve(self, defense: str) -> Reserve:
        """The reserve, or a UserError saying how to get one."""
        if self.reserve is None:
            raise UserError(f"defense {defense} needs clean held-out images: set --eval.reserve N (e.g. 1000)")
        return self.reserve

    def need_truth(self, defense: str, mode: str) -> Truth:
        """The attack's truth for an oracle mode, or a UserError saying it is not known here."""
        if self.truth is None:
            raise UserError(f"defense {defense} mode {mode} uses the true poison count and target class, "
                            "which this caller does not know: pass them (View.truth) or choose another mode")
        return self.truth

    def poisons_in(self, idx: np.ndarray) -> dict[str, int]:
        """{"poisons": n} for a report entry, or nothing when the ground truth is unknown."""
        if self.is_poison_N is None:
            return {}
        return {"poisons": int(np.count_nonzero(self.is_poison_N[idx]))}

    def classes(self) -> list[int]:
        """The labels that occur in the training set."""
        return [int(c) for c in np.unique(self.y_N)]


def _in_classes(pred_N: np.ndarray, num_classes: int) -> bool:
    return pred_N.size == 0 or (int(pred_N.min()) >= 0 and int(pred_N.max()) < num_classes)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    score_N: np.ndarray  # suspicion per training image: higher = more suspicious
    is_clean_N: np.ndarray  # what the defense keeps
    report: dict[str, Any]  # the defense's own section of report.json
    timings_s: dict[str, float]


class Defense:
    """Base class: `Settings` (a settings section), `run`, optionally `check` and `plot`.

    needs_reserve: the defense uses clean held-out images (`eval.reserve` > 0).
    """

    Settings: ClassVar[type]
    needs_reserve: ClassVar[bool] = False

    def __init__(self, settings: Any) -> None:
        self.s = settings

    def check(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        """UserError for settings that do not fit this data, before any work."""

    def oracle(self) -> bool:
        """Whether these settings use the attack's ground truth (`View.truth`)."""
        return False

    def run(self, view: View) -> Result:
        raise NotImplementedError

    def plot(self, result: Result, plots_dir: Path) -> None:
        """The defense's own figures (the run's ROC curve is drawn for every defense)."""


CUTS: tuple[str, ...] = ("threshold", "frr")


def cut_off(clean_N: np.ndarray, rule: str, threshold: float, frr: float) -> float:
    """The score from which an image is flagged (score >= cut): the threshold itself, or (frr) just
    above the largest score that more than a `frr` share of the clean images reach, so that at most
    that share of them is flagged, ties included."""
    if rule == "threshold":
        return float(threshold)
    s = np.sort(np.asarray(clean_N, np.float64))[::-1]
    return float(np.nextafter(s[min(len(s) - 1, int(np.floor(frr * len(s))))], np.inf))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
