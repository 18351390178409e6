"""The `ci-jax` command: `run` (one experiment; every config field is a flag), `sweep` and
`merge` (many runs from a spec), `bench` (throughput per stage)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence


def _set_xla_flags() -> None:
    """Splits the CPU into $CI_JAX_CPU_DEVICES data-parallel XLA devices (default 1).

    Not the default: with XLA:CPU's Eigen convolutions (see ci_jax/__init__.py) one device
    trained ResNet-20 as fast as two on this 2-core machine. (Deeply queued programs deadlocked
    XLA:CPU's in-process all-reduce; `train.throttle` keeps at most two in flight.) Must run
    before jax starts its backends; it shapes only the CPU platform, and a user's own XLA_FLAGS
    setting wins.
    """
    from ci_jax.errors import UserError

    raw = os.environ.get("CI_JAX_CPU_DEVICES", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"CI_JAX_CPU_DEVICES={raw!r}: expected a whole number >= 1")
    flags = os.environ.get("XLA_FLAGS", "")
    if int(raw) > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={raw}".strip()


def _compilation_cache() -> None:
    """XLA's persistent compilation cache in $CI_JAX_CACHE_DIR (default ~/.cache/ci-jax/xla;
    empty: off). Every run of a sweep builds new Trainers over the same programs: with the cache
    only the first one compiles them."""
    import jax

    path = os.environ.get("CI_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ci-jax", "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def _parser() -> argparse.ArgumentParser:
    from ci_jax import config as config_lib

    p = argparse.ArgumentParser(prog="ci-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poison -> train -> CI defense -> retrain -> report",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS),
                     help="base settings; 'seed' = the public notebook's exact recipe")
    run.add_argument("--config", help="JSON or YAML file of config fields, applied over the preset")
    run.add_argument("--out", default="runs/default", help="run directory (reused: resumes and reuses checkpoints)")
    run.add_argument("--data-dir", help="directory with the dataset's files (else $CI_JAX_DATA_DIR, "
                                        "else tensorflow-datasets)")
    run.add_argument("--baseline-from", metavar="RUN_DIR",
                     help="reuse the finished baseline of another run directory (defense ablations)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    fields = run.add_argument_group("config fields (override the preset and --config)")
    for f in dataclasses.fields(config_lib.Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            fields.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            fields.add_argument(flag, dest=f.name, type={"int": int, "float": float, "str": str}[f.type],
                                default=None, metavar=f.type.upper())
    sweep = sub.add_parser("sweep", help="many runs from a spec file; one CSV row per finished run")
    sweep.add_argument("spec", help="YAML, JSON or Python (defining SPEC) sweep spec; see experiments/")
    sweep.add_argument("--out", required=True, help="sweep directory (reused: finished runs are skipped)")
    sweep.add_argument("--shard", default="0/1", metavar="I/N",
                       help="run only shard I of N (0-based; whole baselines per shard), then `ci-jax merge`")
    sweep.add_argument("--data-dir", help="directory with the dataset's files (as for `run`)")
    sweep.add_argument("--plots", action="store_true", help="also draw each run's plots")
    sweep.add_argument("--models", metavar="DIR",
                       help="keep trained models here instead of in --out: sweeps sharing it share models")
    merge = sub.add_parser("merge", help="join a sharded sweep's CSVs and write its summary")
    merge.add_argument("out", help="the sweep directory the shards wrote to")
    bench = sub.add_parser("bench", help="throughput of every stage, per model and batch size")
    from ci_jax import bench as bench_lib

    bench_lib.add_arguments(bench)
    return p


def _config(args: argparse.Namespace):
    from ci_jax import config as config_lib

    overrides = config_lib.load_file(args.config) if args.config else {}
    for f in dataclasses.fields(config_lib.Config):
        if getattr(args, f.name) is not None:
            overrides[f.name] = getattr(args, f.name)
    return config_lib.preset(args.preset, **overrides)


def _run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from ci_jax import experiment

    report = experiment.run(cfg, args.out, data_dir=args.data_dir, make_plots=not args.no_plots,
                            baseline_from=args.baseline_from)
    b, d, r, t = report["baseline"], report["defense"], report["retrained"], report["timings_s"]
    ci_stage = (f" (CI stage {t['features'] + t['gmm'] + t['impurity']:.0f} s: features "
                f"{t['features']:.0f}, GMM {t['gmm']:.0f}, impurity {t['impurity']:.0f})" if "gmm" in t else "")
    print(f"baseline   clean {b['clean_acc']:.4f}  ASR {b['asr']:.4f}\n"
          f"defense    {d['method']} removed {d['removed']}  TPR {d['tpr']:.4f}  FPR {d['fpr']:.4f}  "
          f"precision {d['precision']:.4f}  AUC {d['auc']}\n"
          f"retrained  clean {r['clean_acc']:.4f}  ASR {r['asr']:.4f}\n"
          f"total {t['total']:.0f} s{ci_stage} -> {os.path.join(args.out, 'report.json')}")


def _sweep(args: argparse.Namespace) -> None:
    from ci_jax import sweep

    csv_path = sweep.run(args.spec, args.out, shard=sweep.parse_shard(args.shard), data_dir=args.data_dir,
                         make_plots=args.plots, models_dir=args.models)
    print(f"results -> {csv_path}")
    if csv_path.name == "results.csv":  # the whole sweep, summarised (a shard waits for merge)
        print(open(os.path.join(args.out, "summary.md")).read())


def _merge(args: argparse.Namespace) -> None:
    from ci_jax import sweep

    sweep.merge(args.out)
    print(open(os.path.join(args.out, "summary.md")).read())


def _bench(args: argparse.Namespace) -> None:
    from ci_jax import bench

    bench.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    from ci_jax.errors import UserError

    args = _parser().parse_args(argv)
    try:
        _set_xla_flags()
        _compilation_cache()
        if args.command != "merge":
            from ci_jax import train

            train.init_distributed()  # a no-op unless launched as a multi-process job
        {"run": _run, "sweep": _sweep, "merge": _merge, "bench": _bench}[args.command](args)
    except UserError as e:
        print(f"ci-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
