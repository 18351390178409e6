"""SIGTERM during CI's filtered pass, then a rerun: the resumed run must end with the report of an
uninterrupted run, and its config.json must describe that report.

Starts `ci-jax run` in a fresh directory, waits until the mixtures are fitted (baseline/gmm.json)
and the filtered pass has begun, sends SIGTERM, checks the one-line exit (143), reruns the same
command, and compares report.json with the reference run's, timings and the run's own path apart.

    python experiments/term_resume.py --data-dir ../shared/data/mnist --ref runs/mnist \
        --work runs/term-resume --out experiments/results/term_resume_mnist.json

--ref: a finished run of the same command (default settings); without it the script runs one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "ci_jax.cli", "run"]


def _run(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(CLI + args, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(report))
    out.pop("timings_s")
    out["defense"].pop("timings_s")
    return out


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--ref", help="a finished run directory of the same command")
    p.add_argument("--work", required=True, help="scratch directory (emptied first)")
    p.add_argument("--out", required=True, help="JSON summary")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = ["--data-dir", args.data_dir]
    t0 = time.time()
    ref = Path(args.ref) if args.ref else work / "ref"
    if not args.ref:
        if _run(common + ["--out", str(ref)], work / "ref.log").wait() != 0:
            sys.exit(f"the reference run failed: see {work / 'ref.log'}")

    run_dir = work / "run"
    proc = _run(common + ["--out", str(run_dir)], work / "killed.log")
    gmm = run_dir / "baseline" / "gmm.json"
    while not gmm.exists():
        if proc.poll() is not None:
            sys.exit(f"the run ended ({proc.returncode}) before its mixtures were fitted: see {work / 'killed.log'}")
        time.sleep(0.5)
    time.sleep(8)  # into the filtered pass (about 40 s on MNIST on a CPU)
    passes_before = sorted(q.name for q in (run_dir / "baseline").glob("pass-*.npz"))
    proc.send_signal(signal.SIGTERM)
    t_term = time.time()
    code = proc.wait()
    exit_s = time.time() - t_term
    last_line = (work / "killed.log").read_text().strip().splitlines()[-1]
    left = {"report.json": (run_dir / "report.json").exists(), "config.json": (run_dir / "config.json").exists(),
            "tmp_files": sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*.tmp*"))}

    resumed = _run(common + ["--out", str(run_dir)], work / "resumed.log").wait()
    report = json.loads((run_dir / "report.json").read_text())
    reference = json.loads((ref / "report.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    differ = _diff(_comparable(report), _comparable(reference))
    summary = {
        "command": f"ci-jax run --data-dir {args.data_dir} --out DIR; SIGTERM once DIR/baseline/gmm.json "
                   "exists plus 8 s (CI's filtered pass); the same command again",
        "sigterm": {"exit_code": code, "seconds_to_exit": round(exit_s, 2), "last_line": last_line,
                    "filtered_passes_cached_before_sigterm": passes_before, "left_behind": left},
        "resumed_exit_code": resumed,
        "report_equals_uninterrupted_apart_from_timings": not differ, "fields_that_differ": differ,
        "config_json_equals_report_config": config == report["config"],
        "resumed_timings_s": report["timings_s"], "reference": str(ref),
        "result": {"baseline": report["baseline"], "removed": report["defense"]["removed"],
                   "tpr": report["defense"]["tpr"], "fpr": report["defense"]["fpr"],
                   "retrained": report["retrained"]},
        "wall_s": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("sigterm", "resumed_exit_code",
                                              "report_equals_uninterrupted_apart_from_timings",
                                              "config_json_equals_report_config")}, indent=1))
    ok = code == 143 and resumed == 0 and not differ and summary["config_json_equals_report_config"] \
        and not passes_before and not left["report.json"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
