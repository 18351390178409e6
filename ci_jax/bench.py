"""`ci-jax bench`: throughput of every stage of an experiment, per model and batch size.

Stages: the train step, the features+predictions pass, the filtered (blurred) pass, the per-class
GMM/BIC fits of the CI defense, and an end-to-end estimate: the sum of the stages for the
experiment of a preset (`--preset`, default: the default experiment) on the full training set
(train baseline + features pass + filtered pass + GMM + retrain, each training its epochs, plus
the two test-set passes); it runs no whole experiment. The stages train and run the model as that
preset does (optimizer, augmentation, compute dtype; `--dtypes` times others too).

With --out the JSON is rewritten after every stage ("partial": true until the last), so a bench
stopped by a time limit leaves what it measured.

Each jitted stage is compiled once, timed apart from the steady state, and its FLOPs are read
from XLA's cost analysis of the compiled program, so achieved GFLOP/s can be set against the fp32
matmul peak that the bench measures on the same device (a large jnp.dot). Timings end on
block_until_ready, so the same code times CPU, GPU and TPU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ci_jax import config, data, files
from ci_jax.errors import UserError

# ci_jax.train (flax, optax, orbax: seconds to import) is imported where used: the CLI builds
# this module's parser on every command.

QUICK = dict(batch_sizes=(32,), eval_batch_sizes=(64,), steps=3, pass_images=128, gmm_images=600,
             peak_n=512)
# gmm_images None: the dataset's full training split (DatasetSpec.train_size), what a run clusters.
FULL = dict(batch_sizes=(16, 32, 128), eval_batch_sizes=(64, 512), steps=20, pass_images=8192,
            gmm_images=None, peak_n=4096)
SYNTHETIC_SIZES = dict(n_train=2000, n_test=500)  # the stand-in images without --data-dir


def add_arguments(p: argparse.ArgumentParser, positive: Callable[[str], int]) -> None:
    from ci_jax import models

    p.add_argument("--preset", choices=sorted(config.PRESETS), metavar="NAME",
                   help="the experiment whose training settings the stages use and whose whole run the "
                        "end-to-end row estimates (its epochs, model, dataset and batch size are the "
                        f"defaults here; one of {', '.join(sorted(config.PRESETS))}; default: default)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="models to time (default: every registered one; with --preset, its model)")
    default = config.Config().data.dataset  # the default experiment's
    p.add_argument("--dataset", metavar="NAME",
                   help=f"dataset whose shape and classes the stages use (default: the preset's, {default} for "
                        "the default); its images with --data-dir, else synthetic ones of its shape")
    p.add_argument("--dtypes", nargs="+", choices=models.COMPUTE_DTYPES, metavar="DTYPE",
                   help="compute dtypes (train.dtype) whose train and pass stages are timed "
                        f"({', '.join(models.COMPUTE_DTYPES)}; default: the preset's)")
    p.add_argument("--batch-sizes", nargs="+", type=positive, metavar="B", help="train batch sizes")
    p.add_argument("--eval-batch-sizes", nargs="+", type=positive, metavar="B", help="batch sizes of the passes")
    p.add_argument("--steps", type=positive, help="timed train steps per repeat")
    p.add_argument("--repeats", type=positive, default=3, help="timed repeats; the best is reported")
    p.add_argument("--pass-images", type=positive, help="images per timed pass")
    p.add_argument("--gmm-images", type=positive,
                   help="features the GMM stage clusters (default: the dataset's training-set size, 60,000 "
                        "for MNIST)")
    p.add_argument("--gmm-model", metavar="MODEL",
                   help="model whose freshly initialised features the GMM stage clusters, without --run "
                        "(default: the preset's, whose features its experiment clusters)")
    p.add_argument("--data-dir", help="the dataset's data directory (else synthetic images of its shape)")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="finished `ci-jax run` directory: the GMM clusters its baseline's features "
                        "(else those of a freshly initialised model)")
    p.add_argument("--convs", action="store_true",
                   help="also time each convolution of the model alone (forward, input and kernel "
                        "gradients) at each train batch size: the ceiling of the train step")
    p.add_argument("--defenses", nargs="*", metavar="NAME",
                   help="also time these defenses (none named: every one) on the baseline's features, caches off")
    p.add_argument("--stack", nargs="+", type=positive, metavar="K",
                   help="also time stacks of K models: the train step and the features pass, per model and in total")
    p.add_argument("--gmm-backends", nargs="+", default=["sklearn", "jax"], metavar="NAME",
                   help="mixture backends whose GMM stage is timed")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test, not a measurement")
    p.add_argument("--out", help="write the results here as JSON")


# -- measuring ----------------------------------------------------------------------------------
def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of fn() over repeats, each ended by block_until_ready."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _compile(jitted, *args) -> tuple[Any, float, float | None]:
    """(compiled, seconds to lower and compile, FLOPs per call by XLA's cost analysis).

    FLOPs come from the lowered program, before backend passes: after them a GPU's convolutions
    are cuDNN custom calls that the analysis does not count, and under SPMD the compiled program
    is one device's share. The lowered one is the whole computation on every backend.
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return compiled, seconds, None if flops is None or flops <= 0 else float(flops)


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Achieved fp32 GFLOP/s of an n x n x n jnp.dot on the default device (default precision)."""
    a_NN = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b_NN = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a_NN, b_NN).block_until_ready()
    calls = max(1, int(2e11 // (2 * n ** 3)) if jax.default_backend() != "cpu" else 1)
    seconds = _best_time(lambda: [dot(a_NN, b_NN) for _ in range(calls)][-1], repeats)
    return 2 * n ** 3 * calls / seconds / 1e9


def _rates(images: int, seconds: float, flops_per_image: float | None, peak: float) -> dict[str, Any]:
    gflops = flops_per_image * images / seconds / 1e9 if flops_per_image else None
    return {"images_per_s": images / seconds, "gflops": gflops,
            "pct_of_peak": 100 * gflops / peak if gflops else None}


# -- stages -------------------------------------------------------------------------------------
def stage_config(base: config.Config | None, model: str, batch: int, eval_batch: int,
                 dtype: str | None = None, seed: int | None = None) -> config.Config:
    """`base` (default: the default experiment) with the model, batch sizes, compute dtype and seed
    that a stage times."""
    base = base or config.Config()
    fields = {"train.model": model, "train.batch_size": batch, "eval.batch_size": eval_batch,
              "train.dtype": dtype or base.train.dtype}
    return config.replace(base, fields if seed is None else {**fields, "seed": seed})


def _trainer(model: str, batch: int, eval_batch: int, image_shape, num_classes: int,
             base: config.Config | None = None, dtype: str | None = None):
    from ci_jax import train

    return train.Trainer(stage_config(base, model, batch, eval_batch, dtype), image_shape, num_classes,
                         steps_per_epoch=1000)


def bench_train(model: str, batch: int, x_NHWC: jax.Array, y_N: jax.Array, num_classes: int,
                steps: int, repeats: int, peak: float, base: config.Config | None = None,
                dtype: str | None = None) -> dict[str, Any]:
    """The jitted train step as `Trainer.fit_epoch` runs it, `steps` steps per timed repeat."""
    from ci_jax import train

    t = _trainer(model, batch, batch, x_NHWC.shape[1:], num_classes, base, dtype)
    x_NHWC, y_N = jax.device_put((x_NHWC, y_N), t.replicated)
    idx_SB = t.epoch_indices(x_NHWC.shape[0], 0)
    step_fn, compile_s, flops = _compile(t.train_step, t.state, x_NHWC, y_N, idx_SB, 0, t.lr_S, 0)

    def run():
        losses = []
        for i in range(steps):
            t.state, loss = step_fn(t.state, x_NHWC, y_N, idx_SB, i % idx_SB.shape[0], t.lr_S, i % idx_SB.shape[0])
            losses.append(loss)
            train.throttle(losses)
        return losses

    jax.block_until_ready(run())  # warm-up: first-call allocations
    seconds = _best_time(run, repeats)
    return {"stage": "train", "model": model, "batch": batch, "dtype": t.cfg.train.dtype, "compile_s": compile_s,
            "flops_per_image": flops / batch if flops else None,
            **_rates(steps * batch, seconds, flops / batch if flops else None, peak)}


def bench_pass(model: str, eval_batch: int, x_NHWC: np.ndarray, num_classes: int, repeats: int,
               peak: float, transform: Callable | None = None, base: config.Config | None = None,
               dtype: str | None = None) -> dict[str, Any]:
    """`Trainer.predict` over x_NHWC (features + predictions), optionally through a filter.

    FLOPs are the forward pass's: the filter runs as a program of its own and adds next to none.
    """
    t = _trainer(model, 32, eval_batch, x_NHWC.shape[1:], num_classes, base, dtype)
    x_dev = jax.device_put(jnp.asarray(x_NHWC[:eval_batch]), t.replicated)
    _, compile_s, flops = _compile(t.eval_step, t.model_state, x_dev, 0, eval_batch)
    t.predict(x_NHWC[:eval_batch], transform)  # warm-up through predict's own jit cache
    seconds = _best_time(lambda: t.predict(x_NHWC, transform), repeats)
    per_image = flops / eval_batch if flops else None
    return {"stage": "filtered" if transform else "features", "model": model, "batch": eval_batch,
            "dtype": t.cfg.train.dtype, "compile_s": compile_s, "flops_per_image": per_image,
            **_rates(len(x_NHWC), seconds, per_image, peak)}


def _conv_eqns(jaxpr) -> list[Any]:
    """Every conv_general_dilated in a jaxpr, including those inside custom_vjp and jit calls."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_conv_eqns(inner))
    return found


def model_convs(model: str, batch: int, image_shape, num_classes: int) -> list[dict[str, Any]]:
    """The distinct convolutions of one forward pass: shapes, parameters and how often each occurs."""
    from flax import nnx

    from ci_jax import models

    # Shapes only: the model is traced, never initialised (each initialiser would compile).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.create(model, image_shape[-1], num_classes, seed=0,
                                                                     image_size=image_shape[0])))
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
    convs: dict[tuple, dict[str, Any]] = {}
    for eqn in _conv_eqns(jaxpr):
        lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
        p = {k: eqn.params[k] for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
                                         "dimension_numbers", "feature_group_count")}
        key = (lhs, rhs, repr(p))
        if key not in convs:
            convs[key] = {"lhs": lhs, "rhs": rhs, "out": tuple(eqn.outvars[0].aval.shape), "params": p,
                          "count": 0, "is_input": lhs == (batch, *image_shape)}
        convs[key]["count"] += 1
    return list(convs.values())


def conv_stages(p: dict[str, Any]) -> dict[str, Callable]:
    """Jitted forward, input gradient and kernel gradient of one convolution's parameters."""
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, p["window_strides"], p["padding"], p["lhs_dilation"],
                                            p["rhs_dilation"], p["dimension_numbers"], p["feature_group_count"])

    return {"forward": jax.jit(conv),
            "input_grad": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
            "kernel_grad": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])}


def seconds_per_call(fn: Callable, args: tuple, repeats: int) -> float:
    """Best time of one call, from batches of calls lasting about 50 ms (short calls time badly)."""
    jax.block_until_ready(fn(*args))
    calls = max(1, int(0.05 // max(_best_time(lambda: fn(*args), 1), 1e-6)))
    return _best_time(lambda: [fn(*args) for _ in range(calls)][-1], repeats) / calls


def bench_convs(model: str, batch: int, image_shape, num_classes: int, repeats: int,
                peak: float) -> dict[str, Any]:
    """Each convolution alone, jitted: forward, input gradient, kernel gradient.

    The sum over the model's convolutions is what one train step would cost if it did nothing
    else: batch / that sum is the ceiling of the train step's images/s, whatever the rest of the
    step (BatchNorm, ReLU, the optimizer) is made to cost. (XLA may run two independent
    convolutions of a step at once; where each one alone already keeps every core busy, as on
    a CPU, that gains little.) The first layer's input gradient is left out: the train step
    never computes it (images take no gradient).
    """
    rng = np.random.default_rng(0)  # on the host: a jax.random draw would compile a program per shape
    rows, train_s, pass_s = [], 0.0, 0.0
    for c in model_convs(model, batch, image_shape, num_classes):
        x, w, g = (jnp.asarray(rng.standard_normal(c[k], dtype=np.float32)) for k in ("lhs", "rhs", "out"))
        flops = 2 * math.prod(c["out"]) * math.prod(c["rhs"]) / c["out"][-1]  # MACs x 2, NHWC/HWIO
        row = {"lhs": list(c["lhs"]), "rhs": list(c["rhs"]), "strides": list(c["params"]["window_strides"]),
               "count": c["count"]}
        for name, fn in conv_stages(c["params"]).items():
            if name == "input_grad" and c["is_input"]:
                continue
            s = seconds_per_call(fn, (x, w) if name == "forward" else (x, w, g), repeats)
            row[f"{name}_ms"] = 1e3 * s
            row[f"{name}_gflops"] = flops / s / 1e9
            train_s += c["count"] * s
            pass_s += c["count"] * s if name == "forward" else 0.0
        rows.append(row)
    return {"stage": "convs", "model": model, "batch": batch, "convs": rows,
            "train_ceiling_images_per_s": batch / train_s, "pass_ceiling_images_per_s": batch / pass_s,
            "train_convs_ms": 1e3 * train_s, "pass_convs_ms": 1e3 * pass_s, "peak_gflops": peak}


def bench_gmm(view, source: str, backend: str, base: config.Config | None = None) -> dict[str, Any]:
    """The CI defense's mixtures as it fits them (scikit-learn: per class in parallel processes;
    jax: every class at once on the device), with the settings of `base` (default: the default
    experiment's)."""
    from ci_jax.defenses import ci, gmm, gmm_jax

    cfg = config.replace(base or config.Config(), {"defense.ci.gmm_backend": backend})
    search = ci.CI(cfg.defense.ci).search(cfg.seed)
    fit = gmm_jax.cluster if backend == "jax" else gmm.cluster
    t0 = time.perf_counter()
    _, classes = fit(view.feats_ND, view.y_N, search)
    first = time.perf_counter() - t0
    # Once more: the JAX backend's first call compiles one program per k (kept by the persistent
    # compilation cache across runs); scikit-learn's starts its worker processes.
    t0 = time.perf_counter()
    fit(view.feats_ND, view.y_N, search)
    seconds = time.perf_counter() - t0
    fits = sum(max(1, len(c["bic"])) for c in classes)
    return {"stage": "gmm", "backend": backend, "features": int(view.feats_ND.shape[0]),
            "dim": int(view.feats_ND.shape[1]), "source": source, "bic_search": search.bic_search,
            "seconds": seconds, "first_call_s": first, "fits": fits, "fits_per_s": fits / seconds,
            "k_per_class": [c["k"] for c in classes]}


def bench_defense(view, name: str, source: str, base: config.Config | None = None) -> dict[str, Any]:
    """One defense's `run` on the baseline's cached features, with its own caches off: what a
    first run of it costs (CI: mixtures, filtered pass and impurity; STRIP: its blended passes)."""
    import dataclasses as dc

    from ci_jax import defenses

    cfg = config.replace(base or config.Config(), {"defense.name": name, "eval.reserve": 1000})
    defense = defenses.build(name, cfg.defense_settings())
    t0 = time.perf_counter()
    result = defense.run(dc.replace(view, cache_dir=None, timings_s={}))
    seconds = time.perf_counter() - t0
    row = {"stage": "defense", "defense": name, "features": int(view.feats_ND.shape[0]), "source": source,
           "seconds": seconds, "parts_s": result.timings_s, "removed": int((~result.is_clean_N).sum())}
    if "blended_images_per_s" in result.report:
        row["blended_images_per_s"] = result.report["blended_images_per_s"]
    return row


def bench_stack(model: str, batch: int, k: int, x_NHWC: np.ndarray, y_N: np.ndarray, num_classes: int,
                steps: int, repeats: int, eval_batch: int, base: config.Config | None = None,
                dtype: str | None = None) -> dict[str, Any]:
    """A stack of k models (seeds 0..k-1) on one data set: the stacked train step and the stacked
    features pass, images/s per model and for the stack."""
    from ci_jax import stack

    cfgs = [stage_config(base, model, batch, eval_batch, dtype, seed=s) for s in range(k)]
    members = [stack.Member(c, np.arange(len(y_N)), None, f"m{j}") for j, c in enumerate(cfgs)]
    st = stack.Stack(members, x_NHWC.shape[1:], num_classes)
    x, y = jax.device_put((jnp.asarray(x_NHWC), jnp.asarray(y_N, jnp.int32)), st.replicated)
    idx = st.epoch_indices(0)
    steps_K = jnp.asarray(st.steps_K)
    state = st.stacked_state()
    t0 = time.perf_counter()
    state, loss = st.train_step(state, x, y, idx, 0, steps_K, st.lr_KS, 0)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        losses = []
        for i in range(steps):
            holder["state"], loss = st.train_step(holder["state"], x, y, idx, i % idx.shape[1], steps_K, st.lr_KS, 0)
            losses.append(loss)
        return losses

    jax.block_until_ready(run())
    train_s = _best_time(run, repeats)
    st.unstack_into_trainers(holder["state"])
    n_pass = min(len(y_N), 8 * eval_batch)
    stack.predict(st.trainers, x_NHWC, [np.arange(n_pass)] * k)  # compile
    pass_s = _best_time(lambda: stack.predict(st.trainers, x_NHWC, [np.arange(n_pass)] * k), repeats)
    per_model = steps * batch / train_s
    return {"stage": "stack", "model": model, "batch": batch, "k": k, "dtype": cfgs[0].train.dtype,
            "compile_s": compile_s,
            "train_images_per_s_per_model": per_model, "train_images_per_s": per_model * k,
            "pass_images_per_s_per_model": n_pass / pass_s, "pass_images_per_s": n_pass * k / pass_s}


def _baseline_view(args, ds: data.Dataset, n: int, eval_batch: int, base: config.Config | None = None):
    """(View, source): a finished run's baseline (its cached passes, a reserve of 1,000 test
    images), else a freshly initialised model of `base` (default: the default experiment) on the data."""
    from ci_jax import experiment

    if not args.run:
        reps = math.ceil(n / len(ds.y_train))
        x, y = np.concatenate([ds.x_train] * reps)[:n], np.concatenate([ds.y_train] * reps)[:n]
        model = getattr(args, "gmm_model", None) or (base or config.Config()).train.model
        t = _trainer(model, 32, eval_batch, x.shape[1:], ds.num_classes, base)
        pred, feats = t.predict(x)
        r = np.arange(min(1000, len(ds.y_test) // 10))
        tp, tf = t.predict(ds.x_test[r])
        from ci_jax.defenses.base import Reserve, View
        from ci_jax.perturbations import bn_scale

        view = View(x_NHWC=x, y_N=y, feats_ND=feats, pred_N=pred, num_classes=ds.num_classes, predict=t.predict,
                    seed=0, reserve=Reserve(ds.x_test[r], ds.y_test[r], tf, tp, r, key="bench"),
                    bn_layers=bn_scale.count_layers(t.eval_def, t.model_state))
        return view, f"random-init {model}"
    run = experiment.open_run(args.run, dataset=ds, overrides={
        "eval.batch_size": eval_batch, "eval.reserve": min(1000, len(ds.y_test) // 10)})
    cfg, view = run.cfg, run.view
    if n < len(view.y_N):
        import dataclasses as dc

        view = dc.replace(view, x_NHWC=view.x_NHWC[:n], y_N=view.y_N[:n], feats_ND=view.feats_ND[:n],
                          pred_N=view.pred_N[:n], is_poison_N=view.is_poison_N[:n])
    return view, f"trained baseline of {args.run} ({cfg.train.model})"


def end_to_end(results: list[dict[str, Any]], n_train: int, n_test: int, gmm_s: float | None,
               model: str, epochs: int = 1, dtype: str | None = None,
               train_batch: int | None = None) -> dict[str, Any] | None:
    """Seconds of an experiment that trains `epochs` epochs on n_train images, from each stage's best
    throughput (of `dtype`, and for training of `train_batch`, when given: the pass batch changes no
    result, the training batch does); ci_stage_s: the CI defense alone (features pass, GMM,
    filtered pass) on the whole training set."""
    def best(stage):
        rates = [r["images_per_s"] for r in results if r["stage"] == stage and r["model"] == model
                 and (dtype is None or r.get("dtype") == dtype)
                 and (train_batch is None or stage != "train" or r["batch"] == train_batch)]
        return max(rates) if rates else None

    tr, fe, fi = best("train"), best("features"), best("filtered")
    if None in (tr, fe, fi, gmm_s):
        return None
    parts = {"train_baseline": epochs * n_train / tr, "features": n_train / fe, "filtered": n_train / fi,
             "gmm": gmm_s, "retrain": epochs * n_train / tr, "test_passes": 2 * n_test / fe}
    return {"stage": "end_to_end", "model": model, "kind": "sum of stages (estimate)", "epochs": epochs,
            "dtype": dtype, "images": n_train, "test_images": n_test, "seconds": sum(parts.values()), "parts_s": parts,
            "ci_stage_s": parts["features"] + parts["gmm"] + parts["filtered"]}


def device_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    from ci_jax import provenance

    return {**provenance.device(), "processes": jax.process_count(), "host_cpu": cpu, "host_cores": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


# -- command ------------------------------------------------------------------------------------
def bench_data(name: str, data_dir: str | None) -> data.Dataset:
    """The dataset `name` from `data_dir`, or made in memory when that is how it comes; else
    synthetic images of its shape and classes: the stages' timings depend on little else."""
    spec = data.get_dataset(name)
    if data_dir or spec.generate is not None:
        return data.load(name, data_dir)
    return data.synthetic(**SYNTHETIC_SIZES, num_classes=spec.num_classes, image_size=spec.image_size,
                          channels=spec.channels)


def full_size(name: str, ds: data.Dataset) -> tuple[int, int]:
    """(training, test) images of the whole experiment the end-to-end row estimates: the data's own,
    or for synthetic stand-ins the real dataset's split sizes where its spec knows them."""
    spec = data.get_dataset(name)
    if ds.name == "synthetic":
        return spec.train_size or len(ds.y_train), spec.test_size or len(ds.y_test)
    return len(ds.y_train), len(ds.y_test)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All stages for args.models x batch sizes; prints a table, writes args.out if given (after
    every stage, so that a bench cut short leaves what it measured)."""
    base = config.preset(getattr(args, "preset", None) or "default")
    dataset = getattr(args, "dataset", None) or base.data.dataset
    data.get_dataset(dataset)  # an unknown name fails as a dataset, with the nearest one
    base = config.replace(base, {"data.dataset": dataset})  # the augmentation policy of the data timed
    s = {**(QUICK if args.quick else FULL)}
    if getattr(args, "preset", None):
        s["batch_sizes"] = (base.train.batch_size,)  # the preset's own step, which its run takes
    for k in ("batch_sizes", "eval_batch_sizes", "steps", "pass_images", "gmm_images"):
        if getattr(args, k, None):
            s[k] = getattr(args, k)
    for b in (*s["batch_sizes"], *s["eval_batch_sizes"]):
        if b < 1 or b % jax.device_count():
            raise UserError(f"batch size {b} does not split over {jax.device_count()} devices")
    from ci_jax import models
    from ci_jax.errors import unknown_name

    model_names = args.models or ([base.train.model] if getattr(args, "preset", None) else list(models.MODELS))
    for m in (*model_names, *([args.gmm_model] if getattr(args, "gmm_model", None) else [])):
        models.get_model(m)  # an unknown name fails here, before anything is timed
    dtypes = list(dict.fromkeys(getattr(args, "dtypes", None) or [base.train.dtype]))
    ds = bench_data(dataset, args.data_dir)
    s["gmm_images"] = s["gmm_images"] or data.get_dataset(dataset).train_size or len(ds.y_train)
    blur = base.defense.ci.passes(seed=0)[0].transform
    peak = matmul_peak_gflops(s["peak_n"])
    x_dev = jnp.asarray(ds.x_train)
    y_dev = jnp.asarray(ds.y_train, jnp.int32)
    reps = math.ceil(s["pass_images"] / len(ds.y_train))
    x_pass = np.concatenate([ds.x_train] * reps)[: s["pass_images"]]
    results: list[dict[str, Any]] = []
    gmms: list[dict[str, Any]] = []
    report = {"device": device_info(), "fp32_matmul_peak_gflops": peak, "quick": bool(args.quick),
              "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
              "repeats": args.repeats, "data": ds.name, "preset": getattr(args, "preset", None) or "default",
              "dtypes": dtypes, "partial": True, "stages": []}

    def emit(row: dict[str, Any], into: list[dict[str, Any]]) -> None:
        into.append(row)
        _print_row(row)
        if args.out:
            files.write_json(args.out, {**report, "stages": results + gmms})

    for model in model_names:
        for dtype in dtypes:
            for b in s["batch_sizes"]:
                emit(bench_train(model, b, x_dev, y_dev, ds.num_classes, s["steps"], args.repeats, peak, base, dtype),
                     results)
                if args.convs and dtype == dtypes[0]:
                    emit(bench_convs(model, b, ds.x_train.shape[1:], ds.num_classes, args.repeats, peak), results)
            for b in s["eval_batch_sizes"]:
                for transform in (None, blur):
                    emit(bench_pass(model, b, x_pass, ds.num_classes, args.repeats, peak, transform, base, dtype),
                         results)
    for k in args.stack or ():
        for model in model_names:
            emit(bench_stack(model, s["batch_sizes"][0], k, ds.x_train, ds.y_train, ds.num_classes,
                             s["steps"], args.repeats, s["eval_batch_sizes"][0], base, dtypes[0]), results)
    view, source = _baseline_view(args, ds, s["gmm_images"], max(s["eval_batch_sizes"]), base)
    for backend in args.gmm_backends:
        if backend not in ("sklearn", "jax"):
            raise unknown_name("GMM backend", backend, ("sklearn", "jax"))
        emit(bench_gmm(view, source, backend, base), gmms)
    gmm = gmms[0]
    from ci_jax import defenses

    for name in (args.defenses if args.defenses else defenses.NAMES) if args.defenses is not None else ():
        if name not in defenses.NAMES:
            raise unknown_name("defense", name, defenses.NAMES)
        emit(bench_defense(view, name, source, base), results)
    n_train, n_test = full_size(dataset, ds)
    gmm_s = gmm["seconds"] * n_train / gmm["features"] if gmm["features"] != n_train else gmm["seconds"]
    for model in model_names:
        for dtype in dtypes:
            e2e = end_to_end(results, n_train, n_test, gmm_s, model, base.train.epochs, dtype,
                             base.train.batch_size if getattr(args, "preset", None) else None)
            if e2e:
                emit({**e2e, "preset": report["preset"]}, results)
    report = {**report, "partial": False, "stages": results + gmms}
    if args.out:
        files.write_json(args.out, report)
    print(f"device {report['device']['kind']} x{jax.device_count()} ({jax.default_backend()}), "
          f"fp32 matmul peak {peak:.0f} GFLOP/s" + (f" -> {args.out}" if args.out else ""))
    return report


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_row(r: dict[str, Any]) -> None:
    if r["stage"] == "gmm":
        print(f"{'gmm':10s} {r['backend']:9s} {r['features']:>6d} x {r['dim']:<3d} {r['seconds']:8.1f} s "
              f"(first call {r['first_call_s']:.1f} s)  "
              f"{r['fits_per_s']:.2f} fits/s  k={r['k_per_class']}  ({r['source']})", flush=True)
    elif r["stage"] == "defense":
        extra = f"  {r['blended_images_per_s']:.0f} blended img/s" if "blended_images_per_s" in r else ""
        print(f"{'defense':10s} {r['defense']:9s} {r['features']:>6d} images {r['seconds']:8.1f} s  "
              f"removed {r['removed']}{extra}", flush=True)
    elif r["stage"] == "stack":
        print(f"{'stack':10s} {r['model']:9s} B={r['batch']:<5d} K={r['k']:<3d} {r['dtype']:8s} train {r['train_images_per_s']:8.0f} img/s "
              f"({r['train_images_per_s_per_model']:.0f} per model)  pass {r['pass_images_per_s']:8.0f} img/s "
              f"({r['pass_images_per_s_per_model']:.0f} per model)", flush=True)
    elif r["stage"] == "convs":
        for c in r["convs"]:
            times = "  ".join(f"{k[:-3]} {c[k]:6.2f} ms {c[k[:-3] + '_gflops']:5.1f} GFLOP/s"
                              for k in ("forward_ms", "input_grad_ms", "kernel_grad_ms") if k in c)
            print(f"{'  conv':10s} {str(tuple(c['lhs'][1:])):>14s} x{c['count']} s{c['strides'][0]}  {times}")
        print(f"{'convs':10s} {r['model']:9s} B={r['batch']:<5d} convs alone: train step <= "
              f"{r['train_ceiling_images_per_s']:.0f} img/s, pass <= {r['pass_ceiling_images_per_s']:.0f} img/s",
              flush=True)
    elif r["stage"] == "end_to_end":
        print(f"{'end2end':10s} {r['model']:9s} {r['seconds']:8.0f} s  ({r['kind']}, preset {r.get('preset')}, "
              f"{r['epochs']} epoch(s) of {r['images']} images, {r['dtype']}; CI stage {r['ci_stage_s']:.0f} s)",
              flush=True)
    else:
        print(f"{r['stage']:10s} {r['model']:9s} B={r['batch']:<5d} {r['dtype']:8s} {r['images_per_s']:9.0f} img/s  "
              f"compile {r['compile_s']:5.1f} s  {_fmt(r['gflops'], '6.1f')} GFLOP/s "
              f"({_fmt(r['pct_of_peak'], '.2g')} % of peak)", flush=True)
