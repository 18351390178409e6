"""What several test modules share: the config helper, small data makers, file damage, and the
functions that worker processes run.

A plain module (`import helpers`): pyproject.toml puts tests/ on sys.path (pytest's `pythonpath`),
so it imports the same way from every test module, from conftest.py and in a worker process,
whichever way pytest was started. Fixtures live in conftest.py.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from ci_jax import attacks, cli, config, defenses, parallel, train, version
from ci_jax.config import Config
from ci_jax.errors import UserError


# -- the config ------------------------------------------------------------------------------------
def make_cfg(*layers: dict[str, Any], preset: str = "fast", **fields: Any) -> Config:
    """The preset with each layer of {dotted path: value} applied in turn, then the keyword fields
    (`__` for the dots: `train__lr=0.1` is `train.lr`)."""
    overrides: dict[str, Any] = {}
    for layer in layers:
        overrides.update(layer)
    overrides.update({k.replace("__", "."): v for k, v in fields.items()})
    return config.preset(preset, overrides)


def defense_settings(name: str, **fields: Any):
    """The validated default config's settings of defense `name`, with `defense.NAME.KEY = value`
    for each keyword."""
    return getattr(make_cfg({f"defense.{name}.{k}": v for k, v in fields.items()}, preset="default").defense, name)


def without_timings(report: dict) -> dict:
    """A report.json but its timings (the run's and the defense's own)."""
    out = {k: v for k, v in report.items() if k != "timings_s"}
    out["defense"] = {k: v for k, v in report["defense"].items() if k != "timings_s"}
    return out


# -- single trainings ------------------------------------------------------------------------------
ONE_EPOCH = {"train.epochs": 1, "train.batch_size": 32, "eval.batch_size": 64}


def train_cfg(overrides: dict[str, Any] | None = None) -> Config:
    """The fast preset for one epoch (batches of 32, evaluation batches of 64), with {dotted path:
    value} overrides."""
    return make_cfg(ONE_EPOCH, overrides or {})


def trainer(cfg: Config, ds) -> train.Trainer:
    """A fresh Trainer of `cfg` for the whole training split of `ds`."""
    return train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes,
                         train.steps_per_epoch(len(ds.y_train), cfg.train.batch_size))


def weights(t: train.Trainer) -> list:
    """The leaves of a trainer's named state (model and optimizer)."""
    return jax.tree.leaves(t.named_state())


# -- the CLI in process ------------------------------------------------------------------------------
# The start-up line that `run`, `sweep` and `bench` print before they load anything (so an error found
# in the data follows it). The commit part is not compared: the tree may change between this import
# and a subprocess.
STARTUP = re.compile(rf"ci-jax {re.escape(version.version())}( \(git [0-9a-f]{{12}}(, dirty)?\))?: backend ")


def after_startup(err: str) -> list[str]:
    """stderr's lines without the start-up line."""
    lines = err.splitlines()
    return lines[1:] if lines and STARTUP.match(lines[0]) else lines


def finished_run_args(data_dir, out) -> list[str]:
    """The `ci-jax run` arguments of conftest's finished_run (one epoch, ten poisons, no plots): a rerun
    with them over a copy of it finds its models."""
    return ["run", "--preset", "fast", "--data-dir", str(data_dir), "--out", str(out), "--train.epochs", "1",
            "--attack.n_poison", "10", "--no-plots"]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Runs the CLI in-process: its exit code and its stderr after the start-up line."""
    code = cli.main(args)
    return code, "\n".join(after_startup(capsys.readouterr().err.strip()))


# -- damaging files --------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    """Cuts a file to half its length."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    """Flips the lowest bit of the file's middle byte."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


# -- attacks: images and the plug-ins built from a config --------------------------------------------
N, H, W, C = 40, 28, 28, 1  # four_class_images' default shape
# The pixel, patch and blend triggers draw nothing: any generator will do for them.
RNG = np.random.default_rng(0)


def four_class_images(seed: int = 0, n: int = N, c: int = C) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images of U[0, 0.8] and labels 0..3 in turn (10 images per class for n = 40)."""
    rng = np.random.default_rng(seed)
    x_NHWC = rng.uniform(0.0, 0.8, (n, H, W, c)).astype(np.float32)
    y_N = (np.arange(n) % 4).astype(np.int32)
    return x_NHWC, y_N


def ten_class_images(n: int = 400, side: int = 28, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n images of 8-bit values and labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    # 8-bit values, as real images: quantising them again changes nothing but the trigger.
    x = (rng.integers(0, 256, (n, side, side, channels)) / 255).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    return x, y


def target(source: int = 1, target: int = 3, n: int = 4, selection: str = "first", seed: int = 0) -> attacks.Target:
    return attacks.Target(source, target, n, selection, seed)


def pixel_attack(tgt: attacks.Target | None = None, **settings: Any):
    return attacks.pixel.Pixel(attacks.pixel.Settings(**settings), tgt or target())


def build_attack(name: str, n_poison: int = 20, source: int = 0, target: int = 2, selection: str = "first",
                 seed: int = 0, **fields: Any) -> attacks.Attack:
    """Attack `name` as the default config builds it, with `attack.NAME.KEY = value` for each keyword."""
    cfg = make_cfg({"attack.name": name, "attack.n_poison": n_poison, "attack.source": source,
                    "attack.target": target, "attack.selection": selection, "seed": seed,
                    **{f"attack.{name}.{k}": v for k, v in fields.items()}}, preset="default")
    t = attacks.Target(source, target, n_poison, selection, seed)
    return attacks.build(name, cfg.attack_settings(), t)


def config_error(overrides: dict[str, Any]) -> UserError:
    """The UserError the default config raises for `overrides`."""
    with pytest.raises(UserError) as e:
        config.replace(Config(), overrides)
    return e.value


# -- defenses: features with a planted cluster ------------------------------------------------------
D = 16  # feature width


def clean_features(seed: int = 0, num_classes: int = 3, per_class: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """One unit Gaussian blob per class (means N(0, 6^2)), per_class points each."""
    rng = np.random.default_rng(seed)
    means_KD = rng.normal(0, 6, (num_classes, D))
    y_N = np.repeat(np.arange(num_classes), per_class)
    feats_ND = means_KD[y_N] + rng.normal(0, 1, (len(y_N), D))
    return feats_ND.astype(np.float32), y_N


PLANT_TARGET, N_PLANT = 2, 60


def planted_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """clean_features' three classes, and N_PLANT extra points labelled PLANT_TARGET far from that
    class's own blob: the 'poisons'."""
    feats_ND, y_N = clean_features(seed)
    rng = np.random.default_rng(seed + 1)
    plant_MD = rng.normal(0, 6, D) + rng.normal(0, 1, (N_PLANT, D))
    feats_ND = np.concatenate([feats_ND, plant_MD.astype(np.float32)])
    y_N = np.concatenate([y_N, np.full(N_PLANT, PLANT_TARGET)])
    is_poison_N = np.arange(len(y_N)) >= len(y_N) - N_PLANT
    return feats_ND, y_N, is_poison_N


def fitted_view(feats_ND: np.ndarray, y_N: np.ndarray, is_poison_N=None, filtered=None) -> defenses.View:
    """A baseline over clean_features' three classes that fits its training set (its decisions are
    the labels) and whose filtered decisions are `filtered(desc)` (default: unchanged); CI then
    measures the filter only."""
    def predict(x_NHWC, transform=None, desc=None):
        assert transform is not None  # extra passes are filtered ones
        out = y_N if filtered is None else filtered(desc)
        return np.asarray(out, np.int32), feats_ND

    return defenses.View(x_NHWC=np.zeros((len(y_N), 1, 1, 1), np.float32), y_N=y_N, feats_ND=feats_ND,
                         pred_N=y_N.copy(), num_classes=3, predict=predict, seed=0, is_poison_N=is_poison_N)


def run_defense(name: str, feats_ND, y_N, is_poison_N=None, filtered=None, **overrides) -> defenses.Result:
    """Defense `name` (with {dotted path: value} overrides of the default config) on fitted_view."""
    cfg = make_cfg({"defense.name": name, **overrides}, preset="default")
    return defenses.build(name, cfg.defense_settings()).run(fitted_view(feats_ND, y_N, is_poison_N, filtered))


K10 = 10  # classes of planted_with_reserve


def planted_with_reserve(n_per_class: int = 400, n_poison: int = 40, seed: int = 0, reserve_per_class: int = 40):
    """Ten class clusters in D dims; poisons labelled PLANT_TARGET sit in a cluster of their own, far
    from the target's own images. Returns (feats_ND, y_N, is_poison_N, reserve feats, reserve labels)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, (K10, D))
    y = np.repeat(np.arange(K10), n_per_class)
    feats = means[y] + rng.normal(0, 1, (len(y), D))
    poison_mean = means[PLANT_TARGET] + 8 * rng.normal(0, 1, D) / math.sqrt(D)
    poisons = poison_mean + rng.normal(0, 0.5, (n_poison, D))
    feats = np.concatenate([feats, poisons])
    y = np.concatenate([y, np.full(n_poison, PLANT_TARGET)])
    is_poison = np.concatenate([np.zeros(K10 * n_per_class, bool), np.ones(n_poison, bool)])
    ry = np.repeat(np.arange(K10), reserve_per_class)
    rf = means[ry] + rng.normal(0, 1, (len(ry), D))
    return feats.astype(np.float32), y.astype(np.int32), is_poison, rf.astype(np.float32), ry.astype(np.int32)


def reserve_view(feats, y, is_poison, reserve=None, seed=0, predict=None, x=None) -> defenses.View:
    """A View over planted_with_reserve's ten classes, with a reserve and a model's `predict` if given."""
    return defenses.View(x_NHWC=x if x is not None else np.zeros((len(y), 1, 1, 1), np.float32), y_N=y,
                         feats_ND=feats, pred_N=y.copy(), num_classes=K10, predict=predict, seed=seed,
                         reserve=reserve, is_poison_N=is_poison)


def decisions_view(feats, pred, filtered, y, num_classes=3, is_poison=None, **kw) -> defenses.View:
    """A View of a baseline whose decisions are `pred`, and `filtered` through any filter (or
    filtered[name] through the filter whose pass is `name`); view.calls lists the passes asked for."""
    calls = []

    def predict(x_NHWC, transform=None, desc=None):
        assert transform is not None and len(x_NHWC) == len(y)
        calls.append(desc)
        out = filtered[desc] if isinstance(filtered, dict) else filtered
        return np.asarray(out, np.int32), np.zeros((len(y), 1), np.float32)

    view = defenses.View(x_NHWC=np.zeros((len(y), 1, 1, 1), np.float32), y_N=np.asarray(y), feats_ND=feats,
                         pred_N=np.asarray(pred), num_classes=num_classes, predict=predict, seed=0,
                         is_poison_N=is_poison, **kw)
    view.calls = calls
    return view


def run_ci(feats, pred, filtered, y, num_classes, settings, is_poison=None, **kw) -> defenses.Result:
    """CI with `settings` on decisions_view."""
    return defenses.ci.CI(settings).run(decisions_view(feats, pred, filtered, y, num_classes, is_poison, **kw))


# -- what worker processes run (they import it by name, so it lives in a module, not a test file) ---
def square_and_pid(x):
    return x * x, os.getpid()


def thread_vars(_):
    return {v: os.environ.get(v) for v in parallel.THREAD_VARS}


def fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x
