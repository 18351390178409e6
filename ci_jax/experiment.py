"""One experiment: load -> poison -> train baseline -> defend -> remove -> retrain -> evaluate.

A run directory holds `config.json`, `provenance.json` (library versions, device, data hash),
`report.json`, `defense.npz`, `plots/`, and the Orbax checkpoints of the `baseline/` and
`retrained/` models. Each model and each pass is keyed by what produced it (the config's model
sections and the data's content), so a rerun resumes an interrupted stage and reuses a finished
one, and a rerun on other data never reuses a model trained on the old.

config.json and report.json always describe the same run: a rerun writes its config before it
touches a model, removes a report of another run first, and writes its report last. One process
at a time may run in a directory. A model of another setting is moved aside, never deleted
(`checkpoint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ci_jax import attacks, cache, checkpoint, config as config_lib, data, defenses, files, metrics, plots, provenance, train
from ci_jax.config import Config
from ci_jax.defenses.base import Reserve, Truth, View
from ci_jax.errors import UserError
from ci_jax.perturbations import bn_scale
from ci_jax.report import DefenseReport, Detection, Report, Scores

_RESERVE_STREAM = 7  # of the run's seed: which test images are held out


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Everything a run needs that comes from the config and the data alone, checked up front."""

    cfg: Config
    attack: attacks.Attack
    defense: defenses.Defense
    poisoned: attacks.PoisonedSet
    triggered: attacks.TriggeredTest  # from every test image of the attack's classes
    reserve_idx: np.ndarray  # test images held out for the defense
    scored_N: np.ndarray  # bool over the test split: what accuracy and ASR are measured on
    model_key: str


def prepare(cfg: Config, dataset: data.Dataset, like: Prepared | None = None) -> Prepared:
    """The poisoned training set, the triggered test set and the reserve; raises UserError for an
    attack, a defense or a reserve that cannot be carried out on this data, before any work.

    like: another run's Prepared on the same dataset; where it poisoned for the same model key
    (runs of one baseline), its poisoned and triggered sets are taken, not computed again.
    """
    config_lib.validate(cfg)
    key = config_lib.model_key(cfg, dataset.sha256)
    image_shape = tuple(int(d) for d in dataset.x_train.shape[1:])
    target = attacks.Target(cfg.attack.source, cfg.attack.target, cfg.attack.n_poison, cfg.attack.selection, cfg.seed)
    attack = attacks.build(cfg.attack.name, cfg.attack_settings(), target)
    defense = defenses.build(cfg.defense.name, cfg.defense_settings())
    defense.check(image_shape, dataset.num_classes)
    n_test = len(dataset.y_test)
    if cfg.eval.reserve >= n_test:
        raise UserError(f"eval.reserve = {cfg.eval.reserve} holds out the whole {n_test}-image test split: "
                        "leave test images to score")
    if like is not None and like.model_key == key:
        poisoned, triggered = like.poisoned, like.triggered
    else:
        poisoned = attacks.poison_training_set(attack, dataset.x_train, dataset.y_train, dataset.num_classes)
        triggered = attacks.triggered_test_set(attack, dataset.x_test, dataset.y_test, dataset.num_classes)
    reserve_idx = np.sort(np.random.default_rng([cfg.seed, _RESERVE_STREAM]).permutation(n_test)[:cfg.eval.reserve])
    scored = np.ones(n_test, bool)
    scored[reserve_idx] = False
    if attack.poisons and not scored[triggered.idx].any():
        raise UserError(f"the test split has no {triggered.description.replace(', triggered', '')} "
                        "left to measure the attack on: check the data or lower --eval.reserve")
    train.check_batch(cfg.train.batch_size, "--train.batch_size", len(poisoned.y_N))
    # A pass batch beyond the largest set it runs over is padding only (and 2^31 of it is terabytes).
    train.check_batch(cfg.eval.batch_size, "--eval.batch_size", max(len(poisoned.y_N), n_test))
    return Prepared(cfg, attack, defense, poisoned, triggered, reserve_idx, scored, key)


# -- passes -------------------------------------------------------------------------------------
def _test_pass(trainer: train.Trainer, dataset: data.Dataset, triggered: attacks.TriggeredTest) -> dict[str, np.ndarray]:
    pred_test, feats_test = trainer.predict(dataset.x_test, desc="test")
    return {"pred_test": pred_test, "feats_test": feats_test,
            "pred_trig": trainer.predict(triggered.x_NHWC, desc="triggered")[0]}


def _fits(n_train: int | None, n_test: int, n_trig: int, num_classes: int):
    def fits(a: dict[str, np.ndarray]) -> bool:
        shapes = {"pred_test": (n_test,), "pred_trig": (n_trig,)}
        if n_train is not None:
            shapes["pred"] = (n_train,)
        ok = all(a[k].shape == s and a[k].dtype.kind == "i" and (a[k].size == 0 or 0 <= a[k].min() <= a[k].max() < num_classes)
                 for k, s in shapes.items())
        feats = ["feats_test"] + (["feats"] if n_train is not None else [])
        return ok and all(a[k].ndim == 2 and len(a[k]) == (n_train if k == "feats" else n_test)
                          and np.isfinite(a[k]).all() for k in feats)
    return fits


def baseline_passes(baseline: train.Trainer, p: Prepared, dataset: data.Dataset, cache_dirs: list[Path],
                    cfg: Config, timings: dict[str, float]) -> dict[str, np.ndarray]:
    """Everything the evaluation and the defenses need from the baseline, in one go, cached beside
    its checkpoint (passes.npz; see `_cache_dirs`): features and decisions of the training set,
    decisions and features of the test split, decisions on the triggered test images."""
    def compute() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        pred_N, feats_ND = baseline.predict(p.poisoned.x_NHWC, desc="features")
        t1 = time.perf_counter()
        tests = _test_pass(baseline, dataset, p.triggered)
        timings.update(features=t1 - t0, evaluate=time.perf_counter() - t1)
        return {"pred": pred_N, "feats": feats_ND, **tests}

    return cache.npz([d / "passes.npz" for d in cache_dirs], passes_key(p, cfg), compute, passes_fit(p, dataset))


def passes_key(p: Prepared, cfg: Config) -> str:
    return f"{p.model_key}/eval{cfg.eval.batch_size}"


def passes_fit(p: Prepared, dataset: data.Dataset):
    return _fits(len(p.poisoned.y_N), len(dataset.y_test), len(p.triggered.idx), dataset.num_classes)


def _cache_dirs(out: Path | None, baseline_dir: Path, borrowed: bool) -> list[Path]:
    """Where the baseline's passes and the defenses' caches are kept (the first) and also read:
    beside the baseline, or, for a baseline borrowed from another run (--baseline-from), in this
    run's caches/, reading the other run's but never writing into it."""
    return [out / "caches", baseline_dir] if borrowed and out is not None else [baseline_dir]


def defense_view(cfg: Config, dataset: data.Dataset, p: Prepared, baseline: train.Trainer, cache_dirs: list[Path],
                 passes: dict[str, np.ndarray]) -> View:
    """The baseline as the defenses see it: its passes, its reserve, and where to cache."""
    reserve = None
    if len(p.reserve_idx):
        r = p.reserve_idx
        reserve = Reserve(dataset.x_test[r], dataset.y_test[r], passes["feats_test"][r], passes["pred_test"][r], r,
                          key=f"reserve{len(r)}-seed{cfg.seed}")
    return View(x_NHWC=p.poisoned.x_NHWC, y_N=p.poisoned.y_N, feats_ND=passes["feats"], pred_N=passes["pred"],
                num_classes=dataset.num_classes, predict=baseline.predict, seed=cfg.seed, reserve=reserve,
                cache_dir=cache_dirs[0], read_dirs=tuple(cache_dirs[1:]), key=passes_key(p, cfg),
                is_poison_N=p.poisoned.is_poison_N, truth=truth(p),
                bn_layers=bn_scale.count_layers(baseline.eval_def, baseline.model_state))


def truth(p: Prepared) -> Truth:
    """What the attack did, for the defenses' oracle modes: its poison count, and its target class
    where it poisoned anything."""
    n = p.poisoned.n_poison
    return Truth(poisons=n, target=p.cfg.attack.target if n else None)


def defend(p: Prepared, view: View, cfg: Config) -> defenses.Result:
    """The defense's result, computed once per baseline, reserve and defense settings and kept
    beside the baseline (defense-NAME-HASH.npz); a reused result reports no timings of its own."""
    settings = {"settings": config_lib.to_dict(cfg).get("defense", {}).get(cfg.defense.name),
                "reserve": view.reserve.key if view.reserve is not None else None}
    name = f"defense-{cfg.defense.name}-{config_lib.fingerprint(settings)}"
    n = len(view.y_N)
    computed = []

    def compute() -> dict[str, np.ndarray]:
        r = p.defense.run(view)
        computed.append(r)
        return {"score": np.asarray(r.score_N, np.float64), "clean": np.asarray(r.is_clean_N, bool),
                "report": np.asarray(json.dumps(r.report, allow_nan=False))}

    fits = lambda a: a["score"].shape == (n,) and a["clean"].shape == (n,) and a["clean"].dtype == bool \
        and isinstance(json.loads(str(a["report"])), dict)
    arrays = view.cached(name, compute, fits)
    if computed:
        return computed[0]
    return defenses.Result(arrays["score"], arrays["clean"], json.loads(str(arrays["report"])), {})


def epoch_scores(cfg: Config, dataset: data.Dataset, p: Prepared) -> train.Evaluate | None:
    """Clean accuracy and ASR after each training epoch, as BackdoorBench logs them, on the first
    `eval.epoch_images` scored test images and as many triggered ones: a fixed subset, so that
    the curve's points compare and cost little; the report measures on every image."""
    n = cfg.eval.epoch_images
    if n == 0:
        return None
    clean = np.flatnonzero(p.scored_N)[:n]
    on = np.flatnonzero(p.scored_N[p.triggered.idx])[:n]
    x_clean, y_clean, x_trig = dataset.x_test[clean], dataset.y_test[clean], p.triggered.x_NHWC[on]

    def evaluate(trainer: train.Trainer) -> dict[str, float | None]:
        scores = {"clean_acc": metrics.accuracy(trainer.predict(x_clean)[0], y_clean)}
        if p.attack.poisons:
            scores["asr"] = metrics.attack_success_rate(trainer.predict(x_trig)[0], cfg.attack.target)
        return scores
    return evaluate


def _scores(pred_test: np.ndarray, pred_trig: np.ndarray, dataset: data.Dataset, p: Prepared,
            target: int) -> dict[str, Any]:
    """Clean accuracy on the scored test images; ASR on their triggered copies, beside the share
    of the same images that the model assigns to the target without the trigger (its floor: a
    T-shirt taken for a pullover is no backdoor)."""
    on = p.scored_N[p.triggered.idx]
    poisons = p.attack.poisons
    return {"clean_acc": metrics.accuracy(pred_test[p.scored_N], dataset.y_test[p.scored_N]),
            "asr": metrics.attack_success_rate(pred_trig[on], target) if poisons else None,
            "target_rate_untriggered": metrics.attack_success_rate(pred_test[p.triggered.idx][on], target)
            if poisons else None}


# -- the run directory --------------------------------------------------------------------------
def finished_baseline(run_dir: str | os.PathLike, cfg: Config, key: str, flag: str = "--baseline-from") -> Path:
    """The finished baseline of another run, checked to be trained exactly as `cfg` asks on the
    same data; errors name the command-line `flag` that pointed there."""
    path = Path(run_dir) / "baseline"
    try:
        done = files.read_json(path / "done.json")
        saved = files.read_json(Path(run_dir) / "config.json")
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {run_dir}: no finished baseline there ({e}); run `ci-jax run` on it first") from None
    other = config_from_run(saved, f"{flag} {run_dir}")
    if done.get("key") != key:
        diff = [p for p in config_lib.differences(other, cfg) if not p.startswith(("eval.", "defense."))]
        why = f"{', '.join(diff)} differ" if diff else "it was trained on other data"
        raise UserError(f"{flag} {run_dir}: its baseline was trained otherwise ({why}): only eval and "
                        "defense settings may change")
    return path


@dataclasses.dataclass(frozen=True, eq=False)
class OpenRun:
    """What a finished run directory holds, opened for another look (a benchmark, an analysis)."""

    cfg: Config
    dataset: data.Dataset
    prepared: Prepared
    baseline_dir: Path
    baseline: train.Trainer  # the finished baseline, loaded
    passes: dict[str, np.ndarray]  # its cached passes (see `baseline_passes`)
    view: View  # the defenses' view of it, caching beside the baseline


def open_run(run_dir: str | os.PathLike, *, dataset: data.Dataset | None = None,
             data_dir: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
             models: str | os.PathLike | None = None, flag: str = "--run") -> OpenRun:
    """Opens the finished baseline of `run_dir` with its config (and `overrides` of fields that
    train no model, e.g. eval.batch_size), on `dataset` or the data in `data_dir`. Nothing is
    trained; a pass that is not cached yet is computed and kept. Errors name `flag`.
    models: a sweep's models directory (its --models, or its --out): a sweep run's baseline lives
    there, under baselines/KEY, not in the run directory."""
    try:
        saved = files.read_json(Path(run_dir) / "config.json")
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {run_dir}: no readable config.json there ({type(e).__name__}): "
                        "run `ci-jax run` on it first") from None
    cfg = config_from_run(saved, f"{flag} {run_dir}")
    if overrides:
        cfg = config_lib.replace(cfg, overrides)
    if dataset is None:
        dataset = data.load(cfg.data.dataset, data_dir)
    p = prepare(cfg, dataset)
    if models is None:
        baseline_dir = finished_baseline(run_dir, cfg, p.model_key, flag)
    else:
        baseline_dir = Path(models) / "baselines" / p.model_key
        if not checkpoint.finished(baseline_dir, p.model_key):
            raise UserError(f"{flag} {run_dir}: no finished baseline of it under {models}/baselines/: "
                            "give the sweep's --models (or --out) directory")
    baseline = train.Trainer(cfg, dataset.x_train.shape[1:], dataset.num_classes,
                             train.steps_per_epoch(len(p.poisoned.y_N), cfg.train.batch_size))
    checkpoint.load(baseline, baseline_dir)
    passes = baseline_passes(baseline, p, dataset, [baseline_dir], cfg, {})
    return OpenRun(cfg, dataset, p, baseline_dir, baseline, passes,
                   defense_view(cfg, dataset, p, baseline, [baseline_dir], passes))


def config_from_run(saved: Any, where: str) -> Config:
    """A run directory's config.json as a Config; one made before config sections is refused."""
    if isinstance(saved, dict) and "trigger" in saved and "attack" not in saved:
        raise UserError(f"{where}: its config.json is from an older ci-jax (flat fields, before config "
                        "sections): rerun into a new directory")
    return config_lib.from_dict(saved, f"{where}: config.json")


def _take_over(out: Path, cfg: Config, dataset: data.Dataset) -> None:
    """Before any model is trained or loaded, the directory describes this run: its config.json
    and provenance.json are written, and a report of another config or other data goes, with
    defense.npz, so that an interrupted run never leaves a report that contradicts config.json.
    A report of this very run stays until the run rewrites it (a failed rerun loses nothing).
    Figures always go: `--no-plots` draws none, and stale ones would describe nothing."""
    this = json.loads(json.dumps(config_lib.to_dict(cfg)))
    try:
        old = files.read_json(out / "report.json")
        same = old["config"] == this and old["data"]["sha256"] == dataset.sha256
    except Exception:  # noqa: BLE001 - absent, unreadable or of another shape: nothing to keep
        same = False
    if not same:
        (out / "report.json").unlink(missing_ok=True)
        (out / "defense.npz").unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
    files.write_json(out / "config.json", this)
    files.write_json(out / "provenance.json", provenance.record(dataset))


def run(cfg: Config, out: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
        dataset: data.Dataset | None = None, make_plots: bool = True,
        baseline_from: str | os.PathLike | None = None,
        shared_dir: str | os.PathLike | None = None, prepared: Prepared | None = None) -> Report:
    """Runs (or resumes) the experiment in `out` and returns the report written to report.json.

    baseline_from: another run directory whose finished baseline (and cached passes) to use
    instead of `out/baseline`, for defense ablations in separate directories.
    shared_dir: keep models under shared_dir/baselines/ and shared_dir/retrained/, keyed by
    what trained them, so that the runs of a sweep share every model they can.
    prepared: `prepare(cfg, dataset)`, when the caller has it already (a sweep that stacked the
    run's models), so that the data is poisoned once per run.
    """
    config_lib.validate(cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if dataset is None:
        dataset = data.load(cfg.data.dataset, data_dir)
    p = prepared if prepared is not None else prepare(cfg, dataset)
    if p.cfg != cfg or p.model_key != config_lib.model_key(cfg, dataset.sha256):
        raise ValueError("run(prepared=...) was prepared from another config or other data")
    timings["data"] = time.perf_counter() - t0
    baseline_dir = (finished_baseline(baseline_from, cfg, p.model_key) if baseline_from else
                    Path(shared_dir) / "baselines" / p.model_key if shared_dir else Path(out) / "baseline")
    out = files.writable_dir(out, "--out")
    busy = f"--out {out}: another ci-jax run is using this directory; wait for it or choose another --out"
    with files.exclusive(out / ".run.lock", busy=busy):
        files.clear_stale_tmp(out)  # a run directory has one writer: what a kill left is stale
        return _run_locked(cfg, out, dataset, p, baseline_dir, _cache_dirs(out, baseline_dir, bool(baseline_from)),
                           make_plots, shared_dir, timings, t_start)


def _run_locked(cfg: Config, out: Path, dataset: data.Dataset, p: Prepared, baseline_dir: Path,
                cache_dirs: list[Path], make_plots: bool, shared_dir: str | os.PathLike | None, timings: dict[str, float],
                t_start: float) -> Report:
    image_shape = dataset.x_train.shape[1:]
    poisoned = p.poisoned
    baseline = train.Trainer(cfg, image_shape, dataset.num_classes,
                             train.steps_per_epoch(len(poisoned.y_N), cfg.train.batch_size))
    checkpoint.check(baseline_dir, p.model_key)  # a damaged model fails before anything is written
    _take_over(out, cfg, dataset)
    info = train.train(baseline, poisoned.x_NHWC, poisoned.y_N, baseline_dir, p.model_key, desc="baseline",
                       evaluate=epoch_scores(cfg, dataset, p))
    timings["train_baseline"] = info["seconds"]
    _clear_dead_writers(baseline_dir)

    timings["features"] = timings["evaluate"] = 0.0
    passes = baseline_passes(baseline, p, dataset, cache_dirs, cfg, timings)
    before = _scores(passes["pred_test"], passes["pred_trig"], dataset, p, cfg.attack.target)
    tqdm.write(f"baseline: clean acc {metrics.fmt_rate(before['clean_acc'])}, ASR {metrics.fmt_rate(before['asr'])}"
               + (" (reused checkpoint)" if info["reused"] else ""))

    view = defense_view(cfg, dataset, p, baseline, cache_dirs, passes)
    t0 = time.perf_counter()
    result = defend(p, view, cfg)
    timings["defense"] = time.perf_counter() - t0
    detection = metrics.detection(poisoned.is_poison_N, ~result.is_clean_N, result.score_N,
                                  is_cover_N=poisoned.is_cover_N, y_N=poisoned.y_N)
    cache.save_npz(out / "defense.npz", score=result.score_N, removed_idx=np.flatnonzero(~result.is_clean_N),
                   poison_idx=poisoned.poison_idx, cover_idx=np.flatnonzero(poisoned.is_cover_N),
                   reserve_idx=p.reserve_idx)
    tqdm.write(f"{cfg.defense.name} removed {detection['removed']}: TPR {metrics.fmt_rate(detection['tpr'])}, "
               f"FPR {metrics.fmt_rate(detection['fpr'])}, AUC {metrics.fmt_auc(detection['auc'])}")
    if "note" in result.report:
        tqdm.write(f"{cfg.defense.name}: {result.report['note']}")

    retrained_dir, after = _retrain(cfg, out, dataset, p, result.is_clean_N, before, baseline_dir,
                                    shared_dir, timings)
    timings["total"] = time.perf_counter() - t_start
    relative = lambda d: os.path.relpath(d, out)
    report = Report(
        config=config_lib.to_dict(cfg),
        data={"dataset": dataset.name, "sha256": dataset.sha256, "train_images": len(poisoned.y_N),
              "test_images_scored": int(p.scored_N.sum()), "reserve_images": int(len(p.reserve_idx))},
        attack={"name": cfg.attack.name, "poisons": poisoned.n_poison, "covers": poisoned.n_cover,
                "clean_label": p.attack.clean_label, "asr_measured_on": p.triggered.description,
                "asr_images": int(p.scored_N[p.triggered.idx].sum())},
        baseline=Scores(**before, checkpoint=relative(baseline_dir)),
        defense=DefenseReport(cfg.defense.name, Detection(**detection), result.timings_s, result.report),
        retrained=Scores(None, None, skipped=True) if retrained_dir is None else
        Scores(**after, checkpoint=relative(retrained_dir)),
        device=provenance.device(),
        timings_s=timings,
    )
    if make_plots:
        _plots(out / "plots", dataset, p, passes, report, result, baseline_dir, retrained_dir)
    files.write_json(out / "report.json", report.to_json())
    return report


def _retrain(cfg: Config, out: Path, dataset: data.Dataset, p: Prepared, keep_N: np.ndarray,
             before: dict[str, Any], baseline_dir: Path, shared_dir: str | os.PathLike | None,
             timings: dict[str, float]) -> tuple[Path | None, dict[str, Any]]:
    """Retrains from scratch on what the defense kept, keyed by the kept set as well. Training is
    deterministic, so when nothing was removed the retrained model is the baseline itself."""
    timings["retrain"] = 0.0
    if not cfg.defense.retrain:
        tqdm.write("retrain: skipped (defense.retrain is false)")
        return None, {}
    if keep_N.all():
        tqdm.write("retrained: nothing removed, the baseline is the retrained model")
        return baseline_dir, dict(before)
    retrain_key, retrained_dir = retrain_target(p, keep_N, shared_dir, out)
    x_NHWC, y_N = p.poisoned.x_NHWC[keep_N], p.poisoned.y_N[keep_N]
    train.check_batch(cfg.train.batch_size, "--train.batch_size", len(y_N))
    retrained = train.Trainer(cfg, dataset.x_train.shape[1:], dataset.num_classes,
                              train.steps_per_epoch(len(y_N), cfg.train.batch_size))
    info = train.train(retrained, x_NHWC, y_N, retrained_dir, retrain_key, desc="retrain",
                       evaluate=epoch_scores(cfg, dataset, p))
    timings["retrain"] = info["seconds"]
    _clear_dead_writers(retrained_dir)
    t0 = time.perf_counter()
    fits = _fits(None, len(dataset.y_test), len(p.triggered.idx), dataset.num_classes)
    evals = cache.npz(retrained_dir / "eval.npz", f"{retrain_key}/eval{cfg.eval.batch_size}",
                      lambda: _test_pass(retrained, dataset, p.triggered), fits)
    timings["evaluate"] += time.perf_counter() - t0
    after = _scores(evals["pred_test"], evals["pred_trig"], dataset, p, cfg.attack.target)
    tqdm.write(f"retrained: clean acc {metrics.fmt_rate(after['clean_acc'])}, ASR {metrics.fmt_rate(after['asr'])}")
    return retrained_dir, after


def retrain_target(p: Prepared, keep_N: np.ndarray, shared_dir: str | os.PathLike | None,
                   out: Path | None) -> tuple[str, Path]:
    """(key, directory) of the model retrained on what a defense kept: keyed by the baseline and
    the removed set."""
    removed_hash = hashlib.sha256(np.flatnonzero(~keep_N).astype(np.int64).tobytes()).hexdigest()[:16]
    key = f"{p.model_key}-{removed_hash}"
    return key, Path(shared_dir) / "retrained" / key if shared_dir else out / "retrained"


def _clear_dead_writers(model_dir: Path) -> None:
    """Leftovers of killed writers of a model's caches (it may be shared, and read-only)."""
    try:
        files.clear_stale_tmp(model_dir, shared=True)
    except OSError:
        pass


def _plots(path: Path, dataset: data.Dataset, p: Prepared, passes: dict[str, np.ndarray],
           report: Report, result: defenses.Result, baseline_dir: Path, retrained_dir: Path | None) -> None:
    trig = p.triggered
    n = min(8, len(trig.idx))
    plots.examples(path / "examples.png", {report.attack["name"]: (
        dataset.x_test[trig.idx[:n]], trig.x_NHWC[:n], passes["pred_test"][trig.idx[:n]], passes["pred_trig"][:n])})
    if p.poisoned.is_poison_N.any() and not p.poisoned.is_poison_N.all():
        fpr, tpr = metrics.roc_curve(p.poisoned.is_poison_N, result.score_N)
        plots.roc(path / "roc.png", {report.defense.name: (fpr, tpr, report.defense.detection.auc)})
    p.defense.plot(result, path)
    logs = {"baseline": train.read_log(baseline_dir)}
    if retrained_dir is not None and retrained_dir != baseline_dir:
        logs["retrained"] = train.read_log(retrained_dir)
    plots.loss_curves(path / "loss.png", logs)
