"""Repeats timing-sensitive tests many times, on a quiet machine and with every core kept busy by
other processes, and writes the failure counts as JSON.

    python experiments/flake_check.py --repeat 25 --out experiments/results/flake_check_damaged.json \
        tests/test_checkpoint.py -k array_data_truncated

With no test named, it repeats every test marked `timing` (pytest -m timing). Each half runs the
tests `--repeat` times in one pytest process (the suite's own --repeat option); the busy half
starts one spinning process per core first and stops them after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _spin() -> None:
    while True:
        pass


def _pytest(tests: list[str], k: str | None, repeat: int, xml: Path) -> dict:
    select = (tests or ["-m", "timing"]) + (["-k", k] if k else [])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--repeat", str(repeat),
           "-n", "0", f"--junitxml={xml}", *select]  # one process (the suite's default is a worker per core)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for k in counts:
            counts[k] = int(suite.get(k, 0))
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "pytest_exit_code": proc.returncode, "seconds": round(seconds, 1),
            "tail": proc.stdout[-1500:] if proc.returncode else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tests", nargs="*", help="pytest node ids (default: every test marked timing)")
    p.add_argument("-k", help="pytest's -k expression, to pick among the tests")
    p.add_argument("--repeat", type=int, default=25, help="repetitions in each half (default 25)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    work = args.out.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
              "tests": args.tests or ["-m timing"], "k": args.k, "repeat_per_half": args.repeat, "cores": os.cpu_count()}
    result["quiet"] = _pytest(args.tests, args.k, args.repeat, work / "quiet.xml")
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
    for s in spinners:
        s.start()
    try:
        result["busy"] = _pytest(args.tests, args.k, args.repeat, work / "busy.xml")
    finally:
        for s in spinners:
            s.kill()
    result["total"] = {k: result["quiet"][k] + result["busy"][k] for k in ("tests", "passed", "failures", "errors")}
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["total"]))
    return 0 if result["total"]["failures"] + result["total"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
