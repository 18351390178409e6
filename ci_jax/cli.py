"""The `ci-jax` command: `run` (one experiment; every config field is a flag), `sweep` and
`merge` (many runs from a spec), `bench` (throughput per stage).

Config fields are flags named by their dotted path (`--defense.ci.tau 0.3`), the same keys as in
config files and sweep specs; `ci-jax run --help` lists each with its meaning, choices and default.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import signal
import sys
import typing
from typing import Sequence

from ci_jax.errors import one_line

if typing.TYPE_CHECKING:
    from ci_jax.report import Report

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


# What JAX_PLATFORMS may name; "gpu" is either GPU kind.
PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")
_INSTALL = {"cuda": "install JAX's CUDA support: pip install -e '.[cuda12]' (or '.[cuda13]')",
            "gpu": "install JAX's CUDA support: pip install -e '.[cuda12]' (or '.[cuda13]'; ROCm: "
                   "JAX's installation guide)",
            "rocm": "install JAX's ROCm plugin (JAX's installation guide)",
            "tpu": "install JAX's TPU support: pip install -e '.[tpu]'"}


def _start(what: str) -> None:
    """Checks that JAX can start the backend it was asked for, then says on stderr which ci-jax
    runs on which devices, and `what` it does: the first line of a cluster job's log."""
    import jax

    from ci_jax import version

    devices = _devices()
    kinds = ", ".join(dict.fromkeys(d.device_kind for d in devices))
    n, procs = len(devices), jax.process_count()
    where = f" in {procs} processes (this is process {jax.process_index()})" if procs > 1 else ""
    print(f"ci-jax {version.describe()}: backend {jax.default_backend()}, {n} device{'s' * (n != 1)} "
          f"({kinds}){where}; {what}", file=sys.stderr, flush=True)


def _devices() -> list:
    """JAX's devices; UserError when the backend cannot start (JAX_PLATFORMS naming one this JAX
    lacks), before any data is loaded: JAX would fail at the first array, after the data loads."""
    import jax

    from ci_jax.errors import UserError

    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as e:  # jax 0.10 asserts on JAX_PLATFORMS=cuda without CUDA
        raise UserError(_backend_message(jax.config.jax_platforms or "", e)) from None


def _backend_message(asked: str, e: BaseException) -> str:
    """What was asked, what this JAX has, and how to fix it."""
    installed = _installed_platforms()
    have = f"this JAX has: {', '.join(installed)}"  # installed, not necessarily working
    if not asked:
        return f"JAX could not start a backend: {one_line(e, 200)} ({have})"
    wanted = [w.strip().lower() for w in asked.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in (*PLATFORMS, "gpu")]
    if unknown:
        return (f"JAX_PLATFORMS={asked}: {unknown[0]!r} is not a JAX backend (choose from "
                f"{', '.join(PLATFORMS)}, or gpu for cuda or rocm; {have}): correct it, or unset "
                "JAX_PLATFORMS to let JAX choose")
    gpus = [p for p in installed if p in ("cuda", "rocm")]
    missing = [w for w in wanted if w not in installed and not (w == "gpu" and gpus)]
    if missing:
        instead = "run on the CPU" if installed == ["cpu"] else "let JAX choose"
        lacks = "GPU backend (cuda or rocm)" if missing[0] == "gpu" else f"{missing[0]} backend"
        return (f"JAX_PLATFORMS={asked}: this JAX has no {lacks} (it has: {', '.join(installed)}): "
                f"{_INSTALL[missing[0]]}, or unset JAX_PLATFORMS to {instead}")
    return (f"JAX_PLATFORMS={asked}: JAX could not start it: {one_line(e, 200)} ({have}): check that "
            "the device is visible (driver, CUDA_VISIBLE_DEVICES), or unset JAX_PLATFORMS to let JAX choose")


def _installed_platforms() -> list[str]:
    """The backends this JAX could start: the CPU, and each installed plugin (cuda, rocm: PJRT
    plugins in the jax_plugins namespace; tpu: libtpu)."""
    import importlib.util
    import pkgutil

    found = ["cpu"]
    try:
        import jax_plugins

        names = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        names = []
    found += [p for p in ("cuda", "rocm") if any(p in n for n in names)]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("tpu")
    return found


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract, and without prefix matching.

    A prefix of a flag would be taken for the flag (`--defense.ci.ta` set defense.ci.tau), and one
    that fits several (`--defense`, the old flag) was answered with the whole usage; every error
    is one line here, as for any other bad input."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"ci-jax: error: {one_line(message, 300)} (see `{self.prog} --help`)\n")

    def parse_args(self, args: Sequence[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """The arguments; an unknown flag is an error naming the nearest known one of its command."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            sub = getattr(self, "commands", {}).get(command, self)
            flag = next((x for x in extra if x.startswith("-")), None)
            if flag is None:
                sub.error(f"unexpected argument {one_line(repr(extra[0]), 60)}")
            sub.error(f"unknown flag {one_line(flag.split('=', 1)[0], 60)}{_nearest_flag(flag, sub, command)}")
        return parsed

    def flags(self) -> list[str]:
        return list(self._option_string_actions)


class _Version(argparse.Action):
    """--version, computed only when asked: it runs git."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> typing.NoReturn:
        from ci_jax import version

        print(f"ci-jax {version.describe()}")
        parser.exit()


def _parser() -> _Parser:
    from ci_jax import config as config_lib
    from ci_jax import settings

    p = _Parser(prog="ci-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version,
                   help="print the version (and the git commit of a checkout, dirty when edited) and exit")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poison -> train -> defense -> retrain -> report", usage="%(prog)s [options]",
                         description="One experiment: --config overrides the preset, flags override both.")
    run.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS),
                     help="base settings; 'seed' = the public notebook's exact recipe; a field's help "
                          "names each preset that changes its default (default: default)")
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
                                  nargs="+" if leaf.kind is tuple else None,
                                  help=settings.help_text(leaf, config_lib.PRESETS))
    sweep = sub.add_parser("sweep", help="many runs from a spec file; one CSV row per finished run")
    sweep.add_argument("spec", help="YAML, JSON or Python (defining SPEC) sweep spec; see experiments/")
    sweep.add_argument("--out", required=True, help="sweep directory (reused: finished runs are skipped)")
    sweep.add_argument("--shard", default="0/1", metavar="I/N",
                       help="run only shard I of N (0-based; whole baselines per shard), then `ci-jax merge`")
    sweep.add_argument("--data-dir", nargs="+", metavar="DIR|NAME=DIR",
                       help="directory with the dataset's files (as for `run`), or one NAME=DIR per "
                            "dataset of the sweep")
    sweep.add_argument("--where", nargs="+", metavar="PATH=VALUE[,VALUE]",
                       help="run only the runs with these config values, e.g. data.dataset=mnist seed=0, "
                            "or defense=ci/authors for a spec's defense variants (a large spec piece by "
                            "piece; the summary covers every run done)")
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
    p.commands = {"run": run, "sweep": sweep, "merge": merge, "bench": bench}
    return p


def _nearest_flag(flag: str, sub: _Parser, command: str | None) -> str:
    from ci_jax import config as config_lib

    name = flag.split("=", 1)[0]
    old = name.lstrip("-").replace("-", "_")
    if command == "run" and old in config_lib.RENAMED:  # a flat flag of ci-jax before config sections
        return f": it is now --{config_lib.RENAMED[old]}"
    close = difflib.get_close_matches(name, sub.flags(), n=1, cutoff=0.6)
    return f": did you mean {close[0]}?" if close else ""


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
    _start(f"preset {args.preset}" + (f", config {args.config}" if args.config else "") + f" -> {args.out}")
    from ci_jax import experiment

    report = experiment.run(cfg, args.out, data_dir=args.data_dir, make_plots=not args.no_plots,
                            baseline_from=args.baseline_from)
    print(summary(report, os.path.join(args.out, "report.json")))


def summary(report: Report, where: str) -> str:
    """The report in four lines: rates in percent with 2 decimals, AUC with 4 (metrics.fmt_*), and
    the score's TPR at the matched operating points (FPR <= 0.1, 1, 5 %) beside the AUC."""
    from ci_jax.metrics import OPERATING_POINTS, fmt_auc, fmt_rate as pct

    b, d, r, t = report.baseline, report.defense.detection, report.retrained, report.timings_s
    parts = ", ".join(f"{k} {v:.0f}" for k, v in report.defense.timings_s.items())
    points = ""
    if d.tpr_at_fpr is not None:  # None in a report from before they were measured
        at = [d.tpr_at_fpr.get(str(x)) for x in OPERATING_POINTS]
        points = (f"  TPR at FPR <= {'/'.join(f'{100 * x:g}' for x in OPERATING_POINTS)} %: "
                  + " / ".join("n/a" if v is None else f"{100 * v:.2f}" for v in at) + " %")
    return (f"baseline   clean {pct(b.clean_acc)}  ASR {pct(b.asr)}  ({report.attack['asr_measured_on']})\n"
            f"defense    {report.defense.name} removed {d.removed} ({d.removed_poisons} of {d.poisons} poisons, "
            f"{d.removed_clean} of {d.clean_images} others)  TPR {pct(d.tpr)}  FPR {pct(d.fpr)}  "
            f"precision {pct(d.precision)}  AUC {fmt_auc(d.auc)}{points}\n"
            f"retrained  clean {pct(r.clean_acc)}  ASR {pct(r.asr)}\n"
            f"total {t['total']:.0f} s (defense {t['defense']:.0f} s: {parts}) -> {where}")


def _sweep(args: argparse.Namespace) -> None:
    _start(f"sweep {args.spec} -> {args.out}")
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
    _start("bench")
    from ci_jax import bench

    bench.run(args)


def _leave(message: str, code: int) -> None:
    """Ends an interrupted process at once, once every `finally` has run: tearing the interpreter
    down while XLA's threads are still running the interrupted program can crash it."""
    # os._exit skips multiprocessing's exit hook, which releases the worker pool's semaphores: loky's
    # resource tracker (a process of its own, writing to our stderr) would report them as leaked
    # after our last line. Only a process that used the pool has imported the module.
    if (parallel := sys.modules.get("ci_jax.parallel")) is not None:
        try:
            parallel.release()
        except BaseException:  # a second ^C meanwhile: leave all the same, the tracker cleans up
            pass
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
