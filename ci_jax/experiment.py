"""One experiment: load -> poison -> train baseline -> defend -> remove -> retrain -> evaluate.

A run directory holds `config.json`, `provenance.json` (library versions, device, data hash),
`report.json`, `defense.npz`, `plots/`, and the Orbax checkpoints of the `baseline/` and
`retrained/` models. Each stage's checkpoint is keyed by what produced it, so a
rerun resumes an interrupted stage and reuses a finished one: changing only defense settings
retrains nothing but the cleaned model (and not even that if the removal is the same).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from ci_jax import config as config_lib
from ci_jax import data, defenses, files, metrics, plots, poison, provenance, train
from ci_jax.config import Config
from ci_jax.defenses import ci
from ci_jax.errors import UserError


def prepare(cfg: Config, dataset: data.Dataset) -> tuple[poison.PoisonedSet, np.ndarray, np.ndarray]:
    """The poisoned training set, the triggered source-class test images and their test indices.

    Raises UserError on an attack that cannot be carried out, before any work.
    """
    trigger = poison.make_trigger(cfg)
    poisoned = poison.poison_training_set(
        dataset.x_train, dataset.y_train, source=cfg.source, target=cfg.target, n=cfg.n_poison,
        trigger=trigger, selection=cfg.selection, seed=cfg.seed, num_classes=dataset.num_classes)
    x_trig, trig_idx = poison.triggered_test_set(dataset.x_test, dataset.y_test, source=cfg.source,
                                                 trigger=trigger, target=cfg.target,
                                                 num_classes=dataset.num_classes)
    return poisoned, x_trig, trig_idx


def _save_npz(path: Path, **arrays: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    files.atomic_write(path, write)


def _cached(path: Path, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays computed once per key: a stage's output kept beside the checkpoint it came from."""
    if path.exists():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return {k: z[k] for k in z.files if k != "key"}
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable: computed again and rewritten below
    arrays = compute()
    _save_npz(path, key=key, **arrays)
    return arrays


def _test_pass(trainer: train.Trainer, dataset: data.Dataset, x_trig: np.ndarray) -> dict[str, np.ndarray]:
    """A model's decisions on the clean test set and on the triggered source-class images."""
    return {"pred_test": trainer.predict(dataset.x_test, desc="test")[0],
            "pred_trig": trainer.predict(x_trig, desc="triggered")[0]}


def baseline_passes(baseline: train.Trainer, poisoned: poison.PoisonedSet, dataset: data.Dataset,
                    x_trig: np.ndarray, baseline_dir: Path, key: str,
                    timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Everything the evaluation and the defenses need from the baseline, computed in one go and
    cached beside its checkpoint (passes.npz): features and decisions of the training set,
    decisions on the test sets. Sets timings["features"] to the seconds of the training-set pass
    and timings["evaluate"] to those of the test passes, when they run."""
    def compute() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        pred_N, feats_ND = baseline.predict(poisoned.x_NHWC, desc="features")
        t1 = time.perf_counter()
        tests = _test_pass(baseline, dataset, x_trig)
        if timings is not None:
            timings.update(features=t1 - t0, evaluate=time.perf_counter() - t1)
        return {"pred": pred_N, "feats": feats_ND, **tests}
    return _cached(baseline_dir / "passes.npz", key, compute)


def _scores(pred_test: np.ndarray, pred_trig: np.ndarray, dataset: data.Dataset, target: int) -> dict[str, float]:
    return {"clean_acc": metrics.accuracy(pred_test, dataset.y_test),
            "asr": metrics.attack_success_rate(pred_trig, target)}


def finished_baseline(run_dir: str | os.PathLike, cfg: Config, key: str, flag: str = "--baseline-from") -> Path:
    """The finished baseline of another run, checked to be trained exactly as `cfg` asks; errors
    name the command-line `flag` that pointed there."""
    path = Path(run_dir) / "baseline"
    try:
        done = files.read_json(path / "done.json")
        other = config_lib.from_dict(files.read_json(Path(run_dir) / "config.json"))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {run_dir}: no finished baseline there ({e}); "
                        "run `ci-jax run` on it first") from None
    if done.get("key") != key:
        diff = [f for f in config_lib.TRAIN_FIELDS if getattr(other, f) != getattr(cfg, f)]
        raise UserError(f"{flag} {run_dir}: its baseline was trained with other settings "
                        f"({', '.join(diff) or 'unknown fields'} differ): only defense settings may change")
    return path


def run(cfg: Config, out: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
        dataset: data.Dataset | None = None, make_plots: bool = True,
        baseline_from: str | os.PathLike | None = None,
        shared_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs (or resumes) the experiment in `out` and returns the report written to report.json.

    baseline_from: another run directory whose finished baseline (and cached passes) to use
    instead of `out/baseline`, for defense ablations in separate directories.
    shared_dir: keep models under shared_dir/baselines/ and shared_dir/retrained/, keyed by
    what trained them, so that the runs of a sweep share every model they can.
    """
    config_lib.validate(cfg)
    out = Path(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if dataset is None:
        dataset = data.load(cfg.dataset, data_dir)
    poisoned, x_trig, trig_idx = prepare(cfg, dataset)
    timings["data"] = time.perf_counter() - t0
    if out.is_dir():
        files.clear_stale_tmp(out)  # a run directory has one writer: what a kill left is stale
    image_shape = dataset.x_train.shape[1:]
    steps = lambda n: math.ceil(n / cfg.batch_size)

    # Baseline: trained once per training config, resumed if interrupted.
    train_key = config_lib.fingerprint(cfg, config_lib.TRAIN_FIELDS)
    if baseline_from:
        baseline_dir = finished_baseline(baseline_from, cfg, train_key)
    else:
        baseline_dir = Path(shared_dir) / "baselines" / train_key if shared_dir else out / "baseline"
    baseline = train.Trainer(cfg, image_shape, dataset.num_classes, steps(len(poisoned.y_N)))
    info = train.train(baseline, poisoned.x_NHWC, poisoned.y_N, baseline_dir, train_key, desc="baseline")
    timings["train_baseline"] = info["seconds"]
    # Written once the baseline's checkpoints have proved readable: bad input of any kind (data,
    # attack, config, a damaged checkpoint) stops the run before it writes anything of its own.
    files.write_json(out / "config.json", config_lib.to_dict(cfg))
    files.write_json(out / "provenance.json", provenance.record(dataset))

    timings["features"] = timings["evaluate"] = 0.0
    passes = baseline_passes(baseline, poisoned, dataset, x_trig, baseline_dir, train_key, timings)
    before = _scores(passes["pred_test"], passes["pred_trig"], dataset, cfg.target)
    tqdm.write(f"baseline: clean acc {before['clean_acc']:.4f}, ASR {before['asr']:.4f}"
               + (" (reused checkpoint)" if info["reused"] else ""))

    def filtered_pred() -> np.ndarray:
        t0 = time.perf_counter()
        blur = ci.make_filter(cfg.filter, cfg.filter_param, cfg.seed)
        # One file per filter setting: a sweep over sigmas keeps each, instead of overwriting one.
        pred = _cached(baseline_dir / f"filtered-{cfg.filter}-{cfg.filter_param}.npz", train_key,
                       lambda: {"pred": baseline.predict(poisoned.x_NHWC, transform=blur, desc="filtered")[0]})
        timings["filtered"] = time.perf_counter() - t0
        return pred["pred"]

    result = defenses.run(cfg, passes["feats"], passes["pred"], poisoned.y_N, dataset.num_classes,
                          filtered_pred, poisoned.is_poison_N, cache_dir=baseline_dir, feats_key=train_key)
    if cfg.defense == "ci":
        timings["gmm"] = result.timings_s["gmm"]
        timings["impurity"] = timings.pop("filtered", 0.0) + result.timings_s["impurity"]
    else:
        timings["defense"] = result.timings_s["defense"]
    detection = metrics.detection(poisoned.is_poison_N, ~result.is_clean_N, result.score_N)
    _save_npz(out / "defense.npz", score=result.score_N, removed_idx=np.flatnonzero(~result.is_clean_N),
              poison_idx=poisoned.poison_idx)
    tqdm.write(f"{cfg.defense} removed {detection['removed']}: TPR {detection['tpr']:.4f}, "
               f"FPR {detection['fpr']:.4f}, AUC {detection['auc']}")

    # Retrain from scratch on what the defense kept; keyed by the kept set as well. Training is
    # deterministic, so when nothing was removed the retrained model is the baseline itself.
    keep = result.is_clean_N
    if keep.all():
        retrained_dir, after, timings["retrain"] = baseline_dir, before, 0.0
    else:
        kept_hash = hashlib.sha256(np.flatnonzero(~keep).astype(np.int64).tobytes()).hexdigest()[:16]
        retrain_key = f"{train_key}-{kept_hash}"
        retrained_dir = Path(shared_dir) / "retrained" / retrain_key if shared_dir else out / "retrained"
        retrained = train.Trainer(cfg, image_shape, dataset.num_classes, steps(int(keep.sum())))
        info = train.train(retrained, poisoned.x_NHWC[keep], poisoned.y_N[keep], retrained_dir,
                           retrain_key, desc="retrain")
        timings["retrain"] = info["seconds"]
        t0 = time.perf_counter()
        evals = _cached(retrained_dir / "eval.npz", retrain_key, lambda: _test_pass(retrained, dataset, x_trig))
        timings["evaluate"] += time.perf_counter() - t0
        after = _scores(evals["pred_test"], evals["pred_trig"], dataset, cfg.target)
    tqdm.write(f"retrained: clean acc {after['clean_acc']:.4f}, ASR {after['asr']:.4f}")
    timings["total"] = time.perf_counter() - t_start

    extra = {k: v for k, v in result.report.items() if k not in ("method", "removed")}
    report = {
        "config": config_lib.to_dict(cfg),
        "baseline": {**before, "checkpoint": os.path.relpath(baseline_dir, out)},
        "defense": {"method": cfg.defense, **detection, **extra},
        "retrained": {**after, "checkpoint": os.path.relpath(retrained_dir, out)},
        "device": provenance.device(),
        "timings_s": timings,
    }
    if make_plots:
        _plots(out / "plots", dataset, x_trig, trig_idx, passes, cfg, report, poisoned.is_poison_N,
               result.score_N)
    files.write_json(out / "report.json", report)
    return report


def _plots(path: Path, dataset: data.Dataset, x_trig: np.ndarray, trig_idx: np.ndarray,
           passes: dict[str, np.ndarray], cfg: Config, report: dict[str, Any], is_poison_N: np.ndarray,
           score_N: np.ndarray) -> None:
    n = min(8, len(x_trig))
    mark = (cfg.trigger_row, cfg.trigger_col) if cfg.trigger == "pixel" else None
    plots.examples(path / "examples.png", dataset.x_test[trig_idx[:n]], x_trig[:n],
                   passes["pred_test"][trig_idx[:n]], passes["pred_trig"][:n], trigger_rc=mark)
    if cfg.defense == "ci":
        classes = report["defense"]["classes"]
        plots.bic_curves(path / "bic.png", classes)
        plots.impurities(path / "impurity.png", classes, tau=cfg.tau, rule=cfg.rule)
    if is_poison_N.any() and not is_poison_N.all():
        fpr, tpr = metrics.roc_curve(is_poison_N, score_N)
        plots.roc(path / "roc.png", {cfg.defense: (fpr, tpr, report["defense"]["auc"])})
