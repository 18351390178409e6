"""Every setting of a run, in one flat dataclass, with the presets and their validation.

Flat so that each field is one CLI flag (`--n-poison 500`) and one key in config.json.
The fields are grouped by the stage they feed; a stage's checkpoint is reused exactly when the
fields it depends on (`TRAIN_FIELDS` for the baseline) are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ci_jax.errors import UserError

FILTERS: tuple[str, ...] = ("mean2", "mean3", "median3", "gaussian", "noise")
RULES: tuple[str, ...] = ("threshold", "top1")
BIC_SEARCHES: tuple[str, ...] = ("sweep", "ascent")
DEFENSES: tuple[str, ...] = ("ci", "ac", "ss")
AC_REDUCTIONS: tuple[str, ...] = ("pca", "ica")
AC_RULES: tuple[str, ...] = ("size", "silhouette")
COVARIANCES: tuple[str, ...] = ("full", "tied", "diag", "spherical")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("constant", "onecycle", "cosine")
SELECTIONS: tuple[str, ...] = ("first", "random")


@dataclasses.dataclass(frozen=True)
class Config:
    # data
    dataset: str = "mnist"
    # attack: the seed's single-pixel trigger, 1000 zeros relabelled as 'two'
    trigger: str = "pixel"  # pixel | patch | blend | chessboard
    trigger_row: int = 18  # pixel: its position; patch: its top-left corner
    trigger_col: int = 24
    amplitude: float = 0.25  # pixel: value added
    patch_size: int = 3  # patch: side of the checkerboard
    blend_alpha: float = 0.2  # blend: weight of the random pattern
    trigger_seed: int = 0  # blend: seed of the attacker's pattern
    chess_delta: float = 0.1  # chessboard: +/- delta on alternating pixels
    clip: bool = False  # pixel, chessboard: clip the result to [0, 1]
    source: int = 0  # -1: every class but the target (all-to-one)
    target: int = 2
    n_poison: int = 1000
    selection: str = "first"
    # model and training
    model: str = "resnet20"
    epochs: int = 1
    # 16: XLA:CPU runs ResNet-20's train step ~22 % faster per image than at 32 (A/B in one process:
    # 294 vs 241 img/s; at 32 the transposes feeding the kernel-gradient convs take 3x as long for
    # 2x the data), and one epoch still reaches 99.3 % clean accuracy and 91.7 % ASR on real MNIST.
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    seed: int = 0
    # 64: fastest features/filtered pass of ResNet-20 on a 2-core CPU (1,520 img/s vs 1,330 at 512)
    eval_batch_size: int = 64
    # CI defense
    bic_search: str = "ascent"
    k_max: int = 10
    covariance: str = "full"
    reg_covar: float = 1e-3
    filter: str = "mean2"
    filter_param: float = 0.0  # gaussian: sigma (0 -> 1.0); noise: half-width of the uniform noise (0 -> 0.1)
    rule: str = "threshold"
    tau: float = 0.5
    # which defense cleans the training set
    defense: str = "ci"
    # Activation Clustering (Chen et al. 2018)
    ac_reduce: str = "pca"
    ac_dims: int = 10
    ac_rule: str = "size"
    ac_size: float = 0.35  # flag the smaller of the 2 clusters when it holds less than this share
    ac_silhouette: float = 0.1  # silhouette rule: ... and the split scores above this
    # Spectral Signatures (Tran et al. 2018): remove the 1.5 * eps highest scores of each class
    ss_eps: float = 0.1


# Fields that determine the trained baseline; anything else (the defense) can change without
# retraining it.
TRAIN_FIELDS: tuple[str, ...] = (
    "dataset", "trigger", "trigger_row", "trigger_col", "amplitude", "patch_size", "blend_alpha",
    "trigger_seed", "chess_delta", "clip", "source", "target",
    "n_poison", "selection", "model", "epochs", "batch_size", "optimizer", "lr", "momentum",
    "nesterov", "weight_decay", "schedule", "seed")

PRESETS: dict[str, dict[str, Any]] = {
    # One epoch of Adam (one-cycle, peak 2e-3) reaches the seed's clean accuracy and learns the
    # backdoor; one epoch of SGD (one-cycle, peak 0.05, weight decay 5e-4) reached 99.24 % clean but
    # only 1 % ASR: the rare trigger pixel gets too small a step. Defense: the authors' rule
    # (BIC ascent, remove every component with impurity > 0.5) with a 3x3 median filter: the
    # Adam-trained model still answers the trigger after the authors' 2x2 mean (its poison component
    # had impurity 0.11, against up to 0.09 for clean ones), while the median erases an isolated
    # pixel (impurity 2.43 against at most 0.11 for clean components; measured on real MNIST).
    "default": dict(filter="median3"),
    # The public notebook's exact settings.
    "seed": dict(epochs=10, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False,
                 weight_decay=0.0, schedule="constant", bic_search="sweep", k_max=10,
                 reg_covar=1e-6, rule="top1"),
    # For smoke tests and quick looks: a small CNN, minutes instead of a quarter hour on a CPU.
    "fast": dict(model="cnn", epochs=2, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0,
                 schedule="onecycle", nesterov=False),
}


def preset(name: str, **overrides: Any) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(Config(**PRESETS[name]), **overrides)


def replace(cfg: Config, **overrides: Any) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        shown = ", ".join(_show(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise UserError(f"unknown config field(s) {shown}: valid fields are {', '.join(sorted(names))}")
    cfg = dataclasses.replace(cfg, **overrides)
    validate(cfg)
    # 1 and 1.0 are the same setting: normalise so that config.json and fingerprints agree.
    return dataclasses.replace(cfg, **{f.name: float(getattr(cfg, f.name))
                                       for f in dataclasses.fields(Config) if f.type == "float"})


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {_show(value)}: choose one of {', '.join(choices)}")


# Seeds, counts and sizes end up in int32 arrays and in numpy/sklearn seeds (< 2^32), so an int
# beyond this is a typo, and rejecting it here beats an OverflowError deep inside a library.
INT_MAX = 2**31 - 1
# Per numeric field: (lowest, highest, is the lowest itself allowed). Bounds without a field here
# are data-dependent (trigger position, classes) and are checked against the data.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "epochs": (1, INT_MAX, True), "batch_size": (1, INT_MAX, True),
    "eval_batch_size": (1, INT_MAX, True), "k_max": (1, INT_MAX, True),
    "n_poison": (0, INT_MAX, True), "seed": (0, INT_MAX, True),
    "lr": (0.0, math.inf, False), "reg_covar": (0.0, math.inf, False),
    "amplitude": (0.0, math.inf, False), "weight_decay": (0.0, math.inf, True),
    "tau": (0.0, math.inf, True), "momentum": (0.0, math.inf, True),
    # The gaussian filter's kernel radius is 2 sigma: beyond the image size a larger sigma changes
    # nothing, and a huge one would allocate a huge kernel.
    "filter_param": (0.0, 100.0, True),
    "patch_size": (1, INT_MAX, True), "trigger_seed": (0, INT_MAX, True),
    "blend_alpha": (0.0, 1.0, False), "chess_delta": (0.0, 1.0, False),
    "source": (-1, INT_MAX, True),  # -1: every class but the target
    "ac_dims": (1, INT_MAX, True), "ac_size": (0.0, 1.0, False), "ac_silhouette": (-1.0, 1.0, True),
    "ss_eps": (0.0, 2 / 3, False),  # 1.5 eps of each class is removed: at most all of it
}
_TYPE_WORDS = {"int": "an int (a whole number)", "float": "a number", "bool": "true or false",
               "str": "a string"}


class _Repr(reprlib.Repr):
    """Bounded repr: a config file may hold a million-digit int, a huge string or a deep list."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring, self.maxother, self.maxlong, self.maxlevel = 60, 60, 40, 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 10_000:  # str() refuses ints beyond 4300 digits
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_show = _Repr().repr


def _range_text(low: float, high: float, inclusive: bool) -> str:
    if high == math.inf:
        return f"must be {'>=' if inclusive else '>'} {low}"
    return f"must be from {low} to {high}" if inclusive else f"must be > {low} and <= {high}"


def _check_field(name: str, kind: str, v: Any) -> None:
    # bool is an int subclass, so True would pass as 1 for an int or float field.
    want = {"int": int, "float": (int, float), "bool": bool, "str": str}[kind]
    if isinstance(v, bool) and kind != "bool" or not isinstance(v, want):
        raise UserError(f"config field {name} = {_show(v)}: expected {_TYPE_WORDS[kind]}, "
                        f"got {type(v).__name__}")
    if kind == "float":
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise UserError(f"config field {name} = {_show(v)}: expected a finite number")
    if kind not in ("int", "float"):
        return
    low, high, inclusive = _RANGES.get(name, (-INT_MAX - 1, INT_MAX, True))
    if not (low <= v if inclusive else low < v) or v > high:
        raise UserError(f"config field {name} = {_show(v)}: {_range_text(low, high, inclusive)}")


def validate(cfg: Config) -> None:
    """Checks types, ranges and names of every field; data-dependent checks live with the data."""
    for f in dataclasses.fields(Config):
        _check_field(f.name, f.type, getattr(cfg, f.name))
    from ci_jax import data, models, poison  # late: keeps `config` importable without jax

    _choice("dataset", cfg.dataset, data.DATASETS)
    _choice("trigger", cfg.trigger, poison.TRIGGERS)
    _choice("model", cfg.model, models.MODELS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("selection", cfg.selection, SELECTIONS)
    _choice("filter", cfg.filter, FILTERS)
    _choice("rule", cfg.rule, RULES)
    _choice("bic_search", cfg.bic_search, BIC_SEARCHES)
    _choice("covariance", cfg.covariance, COVARIANCES)
    _choice("defense", cfg.defense, DEFENSES)
    _choice("ac_reduce", cfg.ac_reduce, AC_REDUCTIONS)
    _choice("ac_rule", cfg.ac_rule, AC_RULES)
    if cfg.source == cfg.target:
        raise UserError(f"source and target are both class {cfg.source}: the attack must relabel to another class")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: Mapping[str, Any]) -> Config:
    if not isinstance(d, Mapping):
        raise UserError(f"config: expected a mapping of field names to values, got {type(d).__name__}")
    # ** would raise TypeError on a non-string key (YAML reads `1: 2` as an int key).
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise UserError(f"unknown config field(s) {', '.join(_show(k) for k in bad[:5])}: "
                        "field names are strings")
    return replace(Config(), **d)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The config fields in a JSON (.json) or YAML (.yaml, .yml) file, not yet validated."""
    path = Path(path)
    kind = {".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"config file {path}: unknown extension {path.suffix!r}: "
                        "name it .json, .yaml or .yml")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start}): "
                        "is it the right file?") from None
    try:
        d = json.loads(text) if kind == "JSON" else yaml.load(text, Loader=_YamlLoader)
    except json.JSONDecodeError as e:
        raise UserError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                        f"column {e.colno}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"config file {path} is not valid YAML: {_one_line(problem)}{where}") from None
    except (ValueError, RecursionError) as e:
        # ValueError: an int too long for int() or a bad YAML date; RecursionError: absurd nesting.
        raise UserError(f"config file {path} is not valid {kind}: {type(e).__name__}: "
                        f"{_one_line(str(e))}") from None
    if not isinstance(d, dict):
        what = "a JSON object" if kind == "JSON" else "a YAML mapping"
        got = "nothing" if d is None else type(d).__name__
        raise UserError(f"config file {path}: expected {what} of config fields, got {got}")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise UserError(f"config file {path}: key {_show(bad[0])} is not a config field name")
    return d


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (1.0e-3): `lr: 1e-3` would be the string
    '1e-3' and fail validation with a puzzling type error.
    """


_YamlLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first, leaving them as they are
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 200 else text[:197] + "..."


def fingerprint(cfg: Config, fields: tuple[str, ...]) -> str:
    """A short stable hash of the given fields: names a stage's identity in its checkpoint dir."""
    blob = json.dumps({k: getattr(cfg, k) for k in fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

