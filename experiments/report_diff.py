"""Where two runs' report.json differ, timings aside: to show that a change of code left a run's
results as they were.

    python experiments/report_diff.py runs/before/report.json runs/after/report.json \
        --out experiments/results/report_diff_default_mnist.json

Reports written before the defense's own section moved under its name (ci-jax 0.2: its keys
merged flat into "defense") are read in today's layout first, so that a layout change is not
counted as a change of result; what was moved is listed. Exit status 1 when a figure differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ci_jax.report import Report

TIMINGS = {"timings_s", "seconds", "images_per_s"}


def today(report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The report in today's layout (as `Report` reads it), and the keys that moved to get there."""
    d = report.get("defense", {})
    moved = [] if d.get("name") in d else [f"defense.{k} -> defense.{d['name']}.{k}"
                                           for k in Report.from_json(report).defense.own]
    return Report.from_json(report).to_json(), moved


def diff(a: Any, b: Any, path: str = "") -> list[dict[str, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            if k in TIMINGS:
                continue
            where = f"{path}.{k}" if path else k
            if k not in a or k not in b:
                out.append({"path": where, "only_in": "a" if k in a else "b", "value": a.get(k, b.get(k))})
            else:
                out += diff(a[k], b[k], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [{"path": path, "a": a, "b": b}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = p.parse_args()
    (a, moved_a), (b, moved_b) = (today(json.loads(f.read_text())) for f in (args.a, args.b))
    found = diff(a, b)
    result = {"a": str(args.a), "b": str(args.b), "moved_to_todays_layout": {"a": moved_a, "b": moved_b},
              "differences_apart_from_timings": found}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 1 if any("only_in" not in d or not d["path"].startswith("config.") for d in found) else 0


if __name__ == "__main__":
    sys.exit(main())
