"""One experiment: load -> poison -> train baseline -> CI -> remove -> retrain -> evaluate.

A run directory holds `config.json`, `report.json`, `plots/`, and the Orbax checkpoints of the
`baseline/` and `retrained/` models. Each stage's checkpoint is keyed by what produced it, so a
rerun resumes an interrupted stage and reuses a finished one: changing only defense settings
retrains nothing but the cleaned model (and not even that if the removal is the same).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ci_jax import config as config_lib
from ci_jax import data, files, metrics, plots, poison, train
from ci_jax.config import Config
from ci_jax.defenses import ci
from ci_jax.errors import UserError


def _trigger(cfg: Config) -> poison.PixelTrigger:
    return poison.PixelTrigger(row=cfg.trigger_row, col=cfg.trigger_col, amplitude=cfg.amplitude, clip=cfg.clip)


def prepare(cfg: Config, dataset: data.Dataset) -> tuple[poison.PoisonedSet, np.ndarray]:
    """The poisoned training set and the triggered test images; raises UserError on a bad attack."""
    trigger = _trigger(cfg)
    poisoned = poison.poison_training_set(
        dataset.x_train, dataset.y_train, source=cfg.source, target=cfg.target, n=cfg.n_poison,
        trigger=trigger, selection=cfg.selection, seed=cfg.seed, num_classes=dataset.num_classes)
    x_trig = poison.triggered_test_set(dataset.x_test, dataset.y_test, source=cfg.source, trigger=trigger)
    return poisoned, x_trig


def _evaluate(trainer: train.Trainer, dataset: data.Dataset, x_trig: np.ndarray,
              target: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Clean accuracy and ASR, with the test and triggered predictions they came from."""
    pred_test, _ = trainer.predict(dataset.x_test)
    pred_trig, _ = trainer.predict(x_trig) if len(x_trig) else (np.zeros(0, np.int32), None)
    scores = {"clean_acc": metrics.accuracy(pred_test, dataset.y_test),
              "asr": metrics.attack_success_rate(pred_trig, target)}
    return scores, pred_test, pred_trig


def _save_npz(path: Path, **arrays: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    files.atomic_write(path, write)


def _features(trainer: train.Trainer, x_NHWC: np.ndarray, cache: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and features of the training set, cached beside the baseline checkpoint."""
    if cache.exists():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return z["pred"], z["feats"]
    pred, feats = trainer.predict(x_NHWC, desc="features")
    _save_npz(cache, key=key, pred=pred, feats=feats)
    return pred, feats


def _shared_baseline(run_dir: str | os.PathLike, cfg: Config, key: str) -> Path:
    """The finished baseline of another run, checked to be trained exactly as `cfg` asks."""
    path = Path(run_dir) / "baseline"
    try:
        done = files.read_json(path / "done.json")
        other = config_lib.from_dict(files.read_json(Path(run_dir) / "config.json"))
    except (OSError, ValueError) as e:
        raise UserError(f"--baseline-from {run_dir}: no finished baseline there ({e}); "
                        "run `ci-jax run` on it first") from None
    if done.get("key") != key:
        diff = [f for f in config_lib.TRAIN_FIELDS if getattr(other, f) != getattr(cfg, f)]
        raise UserError(f"--baseline-from {run_dir}: its baseline was trained with other settings "
                        f"({', '.join(diff) or 'unknown fields'} differ): only defense settings may change")
    return path


def run(cfg: Config, out: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
        dataset: data.Dataset | None = None, make_plots: bool = True,
        baseline_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Runs (or resumes) the experiment in `out` and returns the report written to report.json.

    baseline_from: another run directory whose finished baseline (and cached features) to use
    instead of `out/baseline`, for defense ablations in separate directories.
    """
    config_lib.validate(cfg)
    out = Path(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if dataset is None:
        dataset = data.load(cfg.dataset, data_dir)
    poisoned, x_trig = prepare(cfg, dataset)
    timings["data"] = time.perf_counter() - t0
    files.write_json(out / "config.json", config_lib.to_dict(cfg))
    image_shape = dataset.x_train.shape[1:]
    steps = lambda n: math.ceil(n / cfg.batch_size)

    # Baseline: trained once per training config, resumed if interrupted.
    train_key = config_lib.fingerprint(cfg, config_lib.TRAIN_FIELDS)
    baseline_dir = _shared_baseline(baseline_from, cfg, train_key) if baseline_from else out / "baseline"
    baseline = train.Trainer(cfg, image_shape, dataset.num_classes, steps(len(poisoned.y_N)))
    info = train.train(baseline, poisoned.x_NHWC, poisoned.y_N, baseline_dir, train_key, desc="baseline")
    timings["train_baseline"] = info["seconds"]
    before, pred_test, pred_trig = _evaluate(baseline, dataset, x_trig, cfg.target)
    tqdm.write(f"baseline: clean acc {before['clean_acc']:.4f}, ASR {before['asr']:.4f}"
               + (" (reused checkpoint)" if info["reused"] else ""))

    # CI: features and clean decisions in one pass, filtered decisions in another.
    t0 = time.perf_counter()
    pred_N, feats_ND = _features(baseline, poisoned.x_NHWC, baseline_dir / "features.npz", train_key)
    timings["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    blur = ci.make_filter(cfg.filter, cfg.filter_param, cfg.seed)
    pred_blur_N, _ = baseline.predict(poisoned.x_NHWC, transform=blur, desc="filtered")
    t_blur = time.perf_counter() - t0
    result = ci.run(feats_ND, pred_N, pred_blur_N, poisoned.y_N, dataset.num_classes, cfg, poisoned.is_poison_N)
    timings["gmm"] = result.timings_s["gmm"]
    timings["impurity"] = t_blur + result.timings_s["impurity"]
    detection = metrics.detection(poisoned.is_poison_N, ~result.is_clean_N, result.score_N)
    _save_npz(out / "defense.npz", score=result.score_N, removed_idx=np.flatnonzero(~result.is_clean_N),
              poison_idx=poisoned.poison_idx)
    tqdm.write(f"CI removed {detection['removed']}: TPR {detection['tpr']:.4f}, FPR {detection['fpr']:.4f}, "
               f"AUC {detection['auc']}")

    # Retrain from scratch on what the defense kept; keyed by the kept set as well. Training is
    # deterministic, so when nothing was removed the retrained model is the baseline itself.
    keep = result.is_clean_N
    if keep.all():
        retrained_dir, after, timings["retrain"] = baseline_dir, before, 0.0
    else:
        kept_hash = hashlib.sha256(np.flatnonzero(~keep).astype(np.int64).tobytes()).hexdigest()[:16]
        retrained_dir = out / "retrained"
        retrained = train.Trainer(cfg, image_shape, dataset.num_classes, steps(int(keep.sum())))
        info = train.train(retrained, poisoned.x_NHWC[keep], poisoned.y_N[keep], retrained_dir,
                           f"{train_key}-{kept_hash}", desc="retrain")
        timings["retrain"] = info["seconds"]
        after, _, _ = _evaluate(retrained, dataset, x_trig, cfg.target)
    tqdm.write(f"retrained: clean acc {after['clean_acc']:.4f}, ASR {after['asr']:.4f}")
    timings["total"] = time.perf_counter() - t_start

    report = {
        "config": config_lib.to_dict(cfg),
        "baseline": {**before, "checkpoint": os.path.relpath(baseline_dir, out)},
        "defense": {"method": "ci", **detection, "classes": result.report["classes"]},
        "retrained": {**after, "checkpoint": os.path.relpath(retrained_dir, out)},
        "device": {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                   "count": jax.device_count()},
        "timings_s": timings,
    }
    if make_plots:
        _plots(out / "plots", dataset, x_trig, pred_test, pred_trig, cfg, report, poisoned.is_poison_N,
               result.score_N)
    files.write_json(out / "report.json", report)
    return report


def _plots(path: Path, dataset: data.Dataset, x_trig: np.ndarray, pred_test: np.ndarray,
           pred_trig: np.ndarray, cfg: Config, report: dict[str, Any], is_poison_N: np.ndarray,
           score_N: np.ndarray) -> None:
    # x_trig is the source-class test images in test-set order, so the rows line up.
    source = dataset.y_test == cfg.source
    n = min(8, len(x_trig))
    plots.examples(path / "examples.png", dataset.x_test[source][:n], x_trig[:n], pred_test[source][:n],
                   pred_trig[:n], trigger_rc=(cfg.trigger_row, cfg.trigger_col))
    classes = report["defense"]["classes"]
    plots.bic_curves(path / "bic.png", classes)
    plots.impurities(path / "impurity.png", classes, tau=cfg.tau, rule=cfg.rule)
    if is_poison_N.any() and not is_poison_N.all():
        fpr, tpr = metrics.roc_curve(is_poison_N, score_N)
        plots.roc(path / "roc.png", {"ci": (fpr, tpr, report["defense"]["auc"])})
