"""The `ci-jax` command: `run` (one experiment; every config field is a flag), `sweep` and
`merge` (many runs from a spec), `bench` (throughput per stage).

Config fields are flags named by their dotted path (`--defense.ci.tau 0.3`), the same keys as in
config files and sweep specs; `ci-jax run --help` lists each with its meaning, choices and default.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from typing import Sequence

INTERRUPTED = "interrupted: rerun the same command to resume"


def _set_xla_flags() -> None:
    """XLA flags for this process (`kernels.xla_flags`), before JAX starts a backend.

    $CI_JAX_CPU_DEVICES=N splits the CPU into N data-parallel devices (default 1: one device
    trained ResNet-20 as fast as two on a 2-core machine).
    """
    from ci_jax import kernels
    from ci_jax.errors import UserError

    raw = os.environ.get("CI_JAX_CPU_DEVICES", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"CI_JAX_CPU_DEVICES={raw!r}: expected a whole number >= 1")
    os.environ["XLA_FLAGS"] = kernels.xla_flags(int(raw))


def _compilation_cache() -> None:
    """XLA's persistent compilation cache in $CI_JAX_CACHE_DIR (default ~/.cache/ci-jax/xla;
    empty: off). Every run of a sweep builds new Trainers over the same programs: with the cache
    only the first one compiles them."""
    import jax

    path = os.environ.get("CI_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ci-jax", "xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _parser() -> argparse.ArgumentParser:
    from ci_jax import config as config_lib
    from ci_jax import settings

    p = argparse.ArgumentParser(prog="ci-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poison -> train -> defense -> retrain -> report",
                         description="One experiment: --config overrides the preset, flags override both.")
    run.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS),
                     help="base settings; 'seed' = the public notebook's exact recipe (default: default)")
    run.add_argument("--config", help="JSON or YAML file of config fields, applied over the preset")
    run.add_argument("--out", default="runs/default",
                     help="run directory (reused: resumes and reuses checkpoints) (default: runs/default)")
    run.add_argument("--data-dir", help="directory with the dataset's files (else $CI_JAX_DATA_DIR, "
                                        "else tensorflow-datasets)")
    run.add_argument("--baseline-from", metavar="RUN_DIR",
                     help="reuse the finished baseline of another run directory (defense ablations)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in settings.leaves(config_lib.Config):
        head = leaf.path.rsplit(".", 1)[0] if "." in leaf.path else "run"
        if head not in groups:
            groups[head] = run.add_argument_group(f"config section {head}" if head != "run" else "config")
        meta = "NAME" if leaf.kind in (str, tuple) else {int: "INT", float: "NUMBER", bool: "true|false"}[leaf.kind]
        groups[head].add_argument(f"--{leaf.path}", dest=leaf.path, default=None, metavar=meta,
                                  nargs="+" if leaf.kind is tuple else None, help=settings.help_text(leaf))
    sweep = sub.add_parser("sweep", help="many runs from a spec file; one CSV row per finished run")
    sweep.add_argument("spec", help="YAML, JSON or Python (defining SPEC) sweep spec; see experiments/")
    sweep.add_argument("--out", required=True, help="sweep directory (reused: finished runs are skipped)")
    sweep.add_argument("--shard", default="0/1", metavar="I/N",
                       help="run only shard I of N (0-based; whole baselines per shard), then `ci-jax merge`")
    sweep.add_argument("--data-dir", nargs="+", metavar="DIR|NAME=DIR",
                       help="directory with the dataset's files (as for `run`), or one NAME=DIR per "
                            "dataset of the sweep")
    sweep.add_argument("--where", nargs="+", metavar="PATH=VALUE[,VALUE]",
                       help="run only the runs with these config values, e.g. data.dataset=mnist seed=0 "
                            "(a large spec piece by piece; the summary covers every run done)")
    sweep.add_argument("--plots", action="store_true", help="also draw each run's plots")
    sweep.add_argument("--stack", type=_positive, default=1, metavar="K",
                       help="train up to K models as one program (baselines that differ in seed or attack, "
                            "retrains of one baseline): for accelerators; default 1")
    sweep.add_argument("--models", metavar="DIR",
                       help="keep trained models here instead of in --out: sweeps sharing it share models")
    merge = sub.add_parser("merge", help="join a sharded sweep's CSVs and write its summary")
    merge.add_argument("out", help="the sweep directory the shards wrote to")
    bench = sub.add_parser("bench", help="throughput of every stage, per model and batch size")
    from ci_jax import bench as bench_lib

    bench_lib.add_arguments(bench, _positive)
    return p


_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--train.lr -1e-3` as `--train.lr=-1e-3`: argparse reads '-1e-3' as a flag otherwise."""
    out = []
    for tok in argv:
        if out and _NUMBER.match(tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _config(args: argparse.Namespace):
    from ci_jax import config as config_lib
    from ci_jax import settings

    overrides = config_lib.flatten(config_lib.load_file(args.config), f"config file {args.config}") \
        if args.config else {}
    for path, leaf in config_lib.PATHS.items():
        text = getattr(args, path)
        if text is not None:
            overrides[path] = list(text) if leaf.kind is tuple else settings.parse_flag_value(leaf, text)
    return config_lib.preset(args.preset, overrides)


def _run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from ci_jax import experiment

    report = experiment.run(cfg, args.out, data_dir=args.data_dir, make_plots=not args.no_plots,
                            baseline_from=args.baseline_from)
    print(summary(report, os.path.join(args.out, "report.json")))


def summary(report: dict, where: str) -> str:
    """The report in four lines."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f} %"

    b, d, r, t = report["baseline"], report["defense"], report["retrained"], report["timings_s"]
    parts = ", ".join(f"{k} {v:.0f}" for k, v in d["timings_s"].items())
    return (f"baseline   clean {pct(b['clean_acc'])}  ASR {pct(b['asr'])}  ({report['attack']['asr_measured_on']})\n"
            f"defense    {d['name']} removed {d['removed']} ({d['removed_poisons']} of {d['poisons']} poisons, "
            f"{d['removed_clean']} of {d['clean_images']} others)  TPR {pct(d['tpr'])}  FPR {pct(d['fpr'])}  "
            f"precision {pct(d['precision'])}  AUC {d['auc'] if d['auc'] is None else round(d['auc'], 4)}\n"
            f"retrained  clean {pct(r['clean_acc'])}  ASR {pct(r['asr'])}\n"
            f"total {t['total']:.0f} s (defense {t['defense']:.0f} s: {parts}) -> {where}")


def _sweep(args: argparse.Namespace) -> None:
    from ci_jax import sweep

    where = sweep.parse_where(args.where)
    csv_path = sweep.run(args.spec, args.out, shard=sweep.parse_shard(args.shard), where=where,
                         data_dir=sweep.parse_data_dirs(args.data_dir),
                         make_plots=args.plots, models_dir=args.models, stack=args.stack)
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


def _leave(message: str, code: int) -> None:
    """Ends an interrupted process at once, once every `finally` has run: tearing the interpreter
    down while XLA's threads are still running the interrupted program can crash it."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` and atomic write cleans up."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def main(argv: Sequence[str] | None = None) -> int:
    from ci_jax.errors import UserError, one_line
    from ci_jax.files import os_reason

    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
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
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"ci-jax: error: cannot write{where}: {os_reason(e)} ({one_line(e, 100)}): fix it and "
              "rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _leave(f"ci-jax: {INTERRUPTED}", 130)
    except _Terminated:
        _leave(f"ci-jax: {INTERRUPTED} (terminated)", 143)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
