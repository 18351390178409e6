"""Every setting of a run, in sections: data, attack, train, eval, defense (one subsection per attack
and per defense), with the presets, config files and the keys that name what a run computed.

Each leaf has one dotted path (`defense.ci.tau`): its key in config files and sweep specs, its
flag (`--defense.ci.tau`) and its name in config.json. What decides the trained baseline is
derived from the sections, never listed by hand: the seed, `data`, `train`, and the chosen attack
(its common fields and its own subsection). `eval` and `defense` change no model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ci_jax import attacks, augment, data, defenses, files, models, settings
from ci_jax.errors import UserError, one_line, unknown_name
from ci_jax.settings import section, setting

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("constant", "onecycle", "cosine")


@section
class Data:
    dataset: str = setting("mnist", "dataset to load", choices=data.DATASETS)


@section
class AttackCommon:
    name: str = setting("pixel", "the attack (none: a clean training set)", choices=attacks.NAMES)
    source: int = setting(0, "class whose images are poisoned; -1: every class but the target (all-to-one)",
                          low=attacks.ALL_SOURCES)
    target: int = setting(2, "class the backdoor leads to", low=0)
    n_poison: int = setting(1000, "number of poisoned training images (from the source classes, or from the "
                            "target class for a clean-label attack)", low=0)
    selection: str = setting("first", "which candidates are poisoned: the first in dataset order (the seed "
                             "notebook) or drawn with the seed", choices=attacks.SELECTIONS)

    def check(self) -> None:
        if self.source == self.target:
            raise UserError(f"attack.source and attack.target are both class {self.source}: "
                            "the attack must relabel to another class")


@section
class DefenseCommon:
    name: str = setting("ci", "the defense that cleans the training set", choices=defenses.NAMES)
    retrain: bool = setting(True, "retrain from scratch on what the defense kept (false: detection only)")


def _holder(name: str, common: type, registry: Mapping[str, type]) -> type:
    """A section of the common fields plus one subsection per plug-in that has settings."""
    subs = [(n, cls.Settings, dataclasses.field(default_factory=cls.Settings))
            for n, cls in registry.items() if cls.Settings is not None]
    return dataclasses.make_dataclass(name, subs, bases=(common,), frozen=True, namespace={"__module__": __name__})


Attack = _holder("Attack", AttackCommon, attacks.REGISTRY)
Defense = _holder("Defense", DefenseCommon, defenses.REGISTRY)


@section
class Train:
    model: str = setting("resnet20", "architecture", choices=models.MODELS)
    epochs: int = setting(1, "training epochs", low=1, high=100_000)
    batch_size: int = setting(16, "training batch size", low=1)
    optimizer: str = setting("adam", "optimizer (adam is AdamW when weight_decay > 0)", choices=OPTIMIZERS)
    lr: float = setting(2e-3, "peak learning rate", low=0.0, low_open=True)
    momentum: float = setting(0.9, "sgd: momentum (0: none)", low=0.0, high=1.0)
    nesterov: bool = setting(False, "sgd: Nesterov momentum")
    weight_decay: float = setting(0.0, "decoupled weight decay of the kernels (not of BatchNorm or biases)",
                                  low=0.0, high=1.0)
    schedule: str = setting("onecycle", "learning-rate schedule over the whole training", choices=SCHEDULES)
    augment: str = setting("none", "training-time augmentation, on the device: crop (a random crop after 4 pixels of "
                           "zero padding) or dataset (that crop, plus a horizontal flip where the dataset allows "
                           "one: CIFAR, not digits or GTSRB); poisons are augmented like every training image, the "
                           "defenses' passes never", choices=augment.CHOICES)
    dtype: str = setting("float32", "compute dtype of training and of the defenses' passes over the model: "
                         "bfloat16 runs the convolutions and matmuls (forward and backward) in bf16, for "
                         "accelerators; the parameters, BatchNorm statistics and optimizer state stay float32",
                         choices=models.COMPUTE_DTYPES)


@section
class Eval:
    batch_size: int = setting(64, "batch size of the inference passes (features, filters, test sets)", low=1)
    reserve: int = setting(0, "clean test images held out for the defenses that need them (scan, strip); "
                           "never used for accuracy or ASR", low=0)
    epoch_images: int = setting(1000, "after each training epoch, clean accuracy and ASR on this many scored "
                                "test images and as many triggered ones, into metrics.jsonl and "
                                "plots/loss.png (0: none); the report's figures use every image", low=0)


@section
class Config:
    seed: int = setting(0, "seeds the poison selection, the model's initialisation and data order, and the "
                        "defenses' randomness", low=0)
    data: Data = dataclasses.field(default_factory=Data)
    attack: Attack = dataclasses.field(default_factory=Attack)
    train: Train = dataclasses.field(default_factory=Train)
    eval: Eval = dataclasses.field(default_factory=Eval)
    defense: Defense = dataclasses.field(default_factory=Defense)

    def check(self) -> None:
        chosen = defenses.REGISTRY[self.defense.name]
        if chosen.needs_reserve and self.eval.reserve == 0:
            raise UserError(f"defense {self.defense.name} needs clean images held out of the test split: "
                            "set --eval.reserve N (e.g. 1000)")

    # -- the chosen plug-ins ----------------------------------------------------------------
    def attack_settings(self) -> Any:
        return getattr(self.attack, self.attack.name, None)

    def defense_settings(self) -> Any:
        return getattr(self.defense, self.defense.name, None)


PATHS: dict[str, settings.Leaf] = settings.leaf_map(Config)

PRESETS: dict[str, dict[str, Any]] = {
    # The defaults of every section: ResNet-20, one epoch of Adam (one-cycle, peak 2e-3), which
    # reaches the seed's clean accuracy and learns the backdoor where one epoch of SGD learns too
    # little of the rare trigger pixel; CI with a 3x3 median instead of the authors' 2x2 mean, which
    # the Adam-trained model still answers the trigger through (experiments/results/README.md).
    "default": {},
    # The public notebook's exact settings.
    "seed": {"train.epochs": 10, "train.batch_size": 32, "train.optimizer": "sgd", "train.lr": 0.01,
             "train.momentum": 0.9, "train.schedule": "constant", "defense.ci.filters": ("mean2",),
             "defense.ci.bic_search": "sweep", "defense.ci.k_max": 10, "defense.ci.reg_covar": 1e-6,
             "defense.ci.rule": "top1"},
    # Real Fashion-MNIST: after one epoch the model has not learned a part of the seed attack's
    # poisons (it takes them for T-shirts, so no filter flips them and CI cannot see them); six
    # epochs learn nearly all (experiments/results/fashion_ci/).
    "fashion": {"data.dataset": "fashion_mnist", "train.epochs": 6},
    # For smoke tests and quick looks: a small CNN, minutes instead of a quarter hour on a CPU.
    "fast": {"train.model": "cnn", "train.epochs": 2, "train.batch_size": 64, "train.lr": 3e-3},
    # The CI authors' CIFAR-10 setting: the attack and training of their code (zhenxianglance/RE-paper:
    # attacks_crafting.py, train_models_contam.py), the defense as the paper describes it. Each
    # number's source: README.md, "The paper preset".
    "paper": {"data.dataset": "cifar10", "attack.name": "static", "attack.source": 1, "attack.target": 7,
              "attack.n_poison": 500, "attack.selection": "random", "attack.static.amplitude": 3 / 255,
              "attack.static.quantise": True,
              "train.model": "resnet18", "train.epochs": 100, "train.batch_size": 32, "train.optimizer": "adam",
              "train.lr": 1e-3, "train.weight_decay": 0.0, "train.schedule": "constant", "train.augment": "none",
              "defense.name": "ci", "defense.ci.filters": ("mean2",), "defense.ci.rule": "threshold",
              "defense.ci.tau": 0.5, "defense.ci.bic_search": "ascent", "defense.ci.k_max": 10,
              "defense.ci.covariance": "full"},
    # A standard strong CIFAR-10 recipe (kuangliu/pytorch-cifar main.py, 93.02 % for ResNet18 in its
    # README): SGD 0.1, momentum 0.9, weight decay 5e-4, cosine over 200 epochs, batch 128, random
    # crop (4-pixel padding) and horizontal flip. The attack and defense stay the defaults.
    "cifar": {"data.dataset": "cifar10", "train.model": "resnet18", "train.epochs": 200, "train.batch_size": 128,
              "train.optimizer": "sgd", "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": False,
              "train.weight_decay": 5e-4, "train.schedule": "cosine", "train.augment": "dataset"},
}


# The flat field names of ci-jax before config sections, and where each went: a config file or spec
# that still uses one gets told the new path.
RENAMED: dict[str, str] = {
    "dataset": "data.dataset", "trigger": "attack.name", "trigger_row": "attack.pixel.row (or attack.patch.row)",
    "trigger_col": "attack.pixel.col (or attack.patch.col)", "amplitude": "attack.pixel.amplitude",
    "patch_size": "attack.patch.size", "blend_alpha": "attack.blend.alpha", "trigger_seed": "attack.blend.pattern_seed",
    "chess_delta": "attack.chessboard.amplitude", "clip": "attack.pixel.clip", "source": "attack.source",
    "target": "attack.target", "n_poison": "attack.n_poison", "selection": "attack.selection",
    "model": "train.model", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "optimizer": "train.optimizer", "lr": "train.lr", "momentum": "train.momentum", "nesterov": "train.nesterov",
    "weight_decay": "train.weight_decay", "schedule": "train.schedule", "eval_batch_size": "eval.batch_size",
    "bic_search": "defense.ci.bic_search", "k_max": "defense.ci.k_max", "covariance": "defense.ci.covariance",
    "reg_covar": "defense.ci.reg_covar", "filter": "defense.ci.filters",
    "filter_param": "defense.ci.gaussian_sigma or defense.ci.noise_width", "rule": "defense.ci.rule",
    "tau": "defense.ci.tau", "defense": "defense.name", "ac_reduce": "defense.ac.reduce", "ac_dims": "defense.ac.dims",
    "ac_rule": "defense.ac.rule", "ac_size": "defense.ac.size", "ac_silhouette": "defense.ac.silhouette",
    "ss_eps": "defense.ss.eps",
}


# Fields taken out, with the value at which an old config (every config.json written before) behaves
# as today: that value is dropped silently, any other is refused with where the setting went.
RETIRED: dict[str, tuple[Any, str]] = {
    "defense.spectre.only_top_class": (False, "defense.spectre.mode: toolbox removes from the most spiked class "
                                       "only, with the true poison count as its budget"),
}


def _drop_retired(d: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        path = f"{prefix}{k}" if isinstance(k, str) else None
        if path in RETIRED:
            same, went = RETIRED[path]
            if not (type(v) is type(same) and v == same):
                raise UserError(f"{where}: config field {path} = {settings.show(v)} is gone; see {went}")
            continue
        out[k] = _drop_retired(v, where, path + ".") if path is not None and isinstance(v, Mapping) else v
    return out


def flatten(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """{dotted path: value} from a mapping of config fields (nested sections or dotted paths); a
    field name from before config sections gets its new path in the error, a retired field
    (`RETIRED`) is dropped at its old default and refused otherwise."""
    if isinstance(d, Mapping):
        d = _drop_retired(d, where)
        old = [k for k, v in d.items() if isinstance(k, str) and k in RENAMED and k not in PATHS
               and not isinstance(v, Mapping)]
        if old:
            raise UserError(f"{where}: config field {old[0]!r} is now {RENAMED[old[0]]} (fields are grouped in "
                            "sections since ci-jax 0.2)")
    return settings.flatten(Config, d, where)


def preset(name: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """The preset `name` with `overrides` ({dotted path: value}, or nested sections) applied."""
    if name not in PRESETS:
        raise unknown_name("preset", name, PRESETS)
    return replace(Config(), {**PRESETS[name], **flatten(overrides or {}, "overrides")})


def replace(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """cfg with {dotted path: value} set, validated."""
    cfg = settings.replace(cfg, overrides)
    settings.validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    settings.validate(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    return settings.to_dict(cfg)


def from_dict(d: Mapping[str, Any], where: str = "config") -> Config:
    """A validated Config from config.json's nested form (or any mapping of fields)."""
    return replace(Config(), flatten(d, where))


# -- what identifies what ---------------------------------------------------------------------
# Train fields added after models had been trained without them, and the value that trains as before:
# at that value a field is left out of a model's identity, so those models keep their keys and are
# reused; any other value is part of the key like every field.
ADDED_LATER: dict[str, Any] = {"augment": "none", "dtype": "float32"}


def model_identity(cfg: Config) -> dict[str, Any]:
    """Everything that decides the trained baseline: the seed, data, training and the chosen
    attack (its common fields and its own settings, not those of the attacks not chosen)."""
    attack = {f.name: getattr(cfg.attack, f.name) for f in dataclasses.fields(AttackCommon)}
    chosen = cfg.attack_settings()
    if chosen is not None:
        attack[cfg.attack.name] = settings.to_dict(chosen)
    train = {k: v for k, v in settings.to_dict(cfg.train).items() if k not in ADDED_LATER or v != ADDED_LATER[k]}
    return {"seed": cfg.seed, "data": settings.to_dict(cfg.data), "attack": attack, "train": train}


def run_identity(cfg: Config) -> dict[str, Any]:
    """Everything that decides a run's result: the config without the subsections of the attacks
    and defenses it does not use (a grid over a defense's field leaves the other defenses' runs alone)."""
    return identity_of(to_dict(cfg))


def identity_of(d: dict[str, Any]) -> dict[str, Any]:
    """`run_identity` of a config in config.json's nested form (a report's `config`): a defense
    or attack added since leaves the runs of the others alone."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for holder in ("attack", "defense"):
        chosen = d[holder]["name"]
        for name in list(d[holder]):
            if isinstance(d[holder][name], dict) and name != chosen:
                del d[holder][name]
    return d


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value."""
    blob = json.dumps(obj, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_key(cfg: Config, data_hash: str) -> str:
    """Names a trained baseline: what trained it, and the content of the data it was trained on."""
    return fingerprint({"config": model_identity(cfg), "data": data_hash})


def differences(a: Config, b: Config) -> list[str]:
    """Dotted paths whose values differ."""
    return [p for p in PATHS if settings.get(a, p) != settings.get(b, p)]


# -- config files -------------------------------------------------------------------------------
def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The config fields in a JSON (.json) or YAML (.yaml, .yml) file, not yet validated: a mapping
    of sections or of dotted paths."""
    path = Path(path)
    kind = {".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"config file {path}: unknown extension {path.suffix!r}: name it .json, .yaml or .yml")
    text = files.read_small_text(path, "config file")
    d = parse(text, kind, f"config file {path}")
    if not isinstance(d, dict):
        what = "a JSON object" if kind == "JSON" else "a YAML mapping"
        got = "nothing" if d is None else type(d).__name__
        raise UserError(f"config file {path}: expected {what} of config fields, got {got}")
    return d


def parse(text: str, kind: str, where: str) -> Any:
    """JSON or YAML text; UserError with the line for bad syntax, a key given twice, or YAML
    anchors (which expand to huge documents: a billion-laughs file)."""
    try:
        if kind == "JSON":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return yaml.load(text, Loader=_YamlLoader)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"{where} is not valid YAML: {one_line(problem)}{at}") from None
    except _Duplicate as e:
        raise UserError(f"{where}: key {settings.show(e.args[0])} is given twice") from None
    except (ValueError, RecursionError) as e:
        # ValueError: an int too long for int() or a bad YAML date; RecursionError: absurd nesting.
        raise UserError(f"{where} is not valid {kind}: {type(e).__name__}: {one_line(e)}") from None


class _Duplicate(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float, refuses a key given twice and refuses anchors.

    PyYAML follows YAML 1.1, where a float needs a dot (1.0e-3): `lr: 1e-3` would be the string
    '1e-3' and fail validation with a puzzling type error.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not supported: write the value out",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _Duplicate(key)
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first, leaving them as they are
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
