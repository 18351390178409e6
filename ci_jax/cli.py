"""`ci-jax run`: the CI experiment from the command line; every config field is a flag."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence


def _set_xla_flags() -> None:
    """Splits the CPU into $CI_JAX_CPU_DEVICES data-parallel XLA devices (default 1).

    Two devices on two cores trained ResNet-20 ~1.5x faster here (one XLA:CPU device does not
    keep two cores busy), but XLA:CPU's in-process all-reduce aborted a run twice ("Termination
    timeout ... 40 seconds exceeded" at a rendezvous), so it is opt-in. Must run before jax starts
    its backends; it shapes only the CPU platform, and a user's own XLA_FLAGS setting wins.
    """
    from ci_jax.errors import UserError

    raw = os.environ.get("CI_JAX_CPU_DEVICES", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"CI_JAX_CPU_DEVICES={raw!r}: expected a whole number >= 1")
    flags = os.environ.get("XLA_FLAGS", "")
    if int(raw) > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={raw}".strip()


def _parser() -> argparse.ArgumentParser:
    from ci_jax import config as config_lib

    p = argparse.ArgumentParser(prog="ci-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poison -> train -> CI defense -> retrain -> report",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS),
                     help="base settings; 'seed' = the public notebook's exact recipe")
    run.add_argument("--config", help="JSON file of config fields, applied over the preset")
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
    bench = sub.add_parser("bench", help="throughput of every stage, per model and batch size")
    from ci_jax import bench as bench_lib

    bench_lib.add_arguments(bench)
    return p


def _config(args: argparse.Namespace):
    from ci_jax import config as config_lib
    from ci_jax.errors import UserError

    overrides = {}
    if args.config:
        try:
            with open(args.config) as f:
                overrides = json.load(f)
        except OSError as e:
            raise UserError(f"cannot read config file {args.config}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"config file {args.config} is not valid JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise UserError(f"config file {args.config}: expected a JSON object of config fields")
    for f in dataclasses.fields(config_lib.Config):
        if getattr(args, f.name) is not None:
            overrides[f.name] = getattr(args, f.name)
    return config_lib.preset(args.preset, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    from ci_jax.errors import UserError

    args = _parser().parse_args(argv)
    try:
        _set_xla_flags()
        if args.command == "bench":
            from ci_jax import bench, train

            train.init_distributed()
            bench.run(args)
            return 0
        cfg = _config(args)
        from ci_jax import experiment

        report = experiment.run(cfg, args.out, data_dir=args.data_dir, make_plots=not args.no_plots,
                                baseline_from=args.baseline_from)
    except UserError as e:
        print(f"ci-jax: error: {e}", file=sys.stderr)
        return 2
    b, d, r = report["baseline"], report["defense"], report["retrained"]
    print(f"baseline   clean {b['clean_acc']:.4f}  ASR {b['asr']:.4f}\n"
          f"defense    removed {d['removed']}  TPR {d['tpr']:.4f}  FPR {d['fpr']:.4f}  "
          f"precision {d['precision']:.4f}  AUC {d['auc']}\n"
          f"retrained  clean {r['clean_acc']:.4f}  ASR {r['asr']:.4f}\n"
          f"total {report['timings_s']['total']:.0f} s -> {os.path.join(args.out, 'report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
