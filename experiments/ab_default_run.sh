#!/usr/bin/env bash
# A/B speed of the main job between two commits: the whole default run (`ci-jax run --data-dir DATA`)
# of each, alternating A B B A A B ..., every run fresh (its own --out, XLA's compilation cache off),
# so that the VM's drift falls on both sides alike. Writes OUT_JSON: each run's wall seconds and
# report timings, the medians, and the ratio of medians B/A.
#   experiments/ab_default_run.sh OLD_REV NEW_REV DATA_DIR OUT_JSON [ROUNDS]   (default 2 rounds)
# Run from the repository root with the project's venv (.venv) installed.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 OLD_REV NEW_REV DATA_DIR OUT_JSON [ROUNDS]" >&2; exit 2; }
old=$1 new=$2 data=$(realpath "$3") out_json=$4 rounds=${5:-2}
[ -d "$data" ] || { echo "$0: no data dir $data" >&2; exit 2; }
py=$PWD/.venv/bin/python
work=$(mktemp -d "${TMPDIR:-/tmp}/ci-jax-ab.XXXXXX")
trap 'git worktree remove --force "$work/A" 2>/dev/null; git worktree remove --force "$work/B" 2>/dev/null; rm -rf "$work"' EXIT
git worktree add --detach "$work/A" "$old" >/dev/null
git worktree add --detach "$work/B" "$new" >/dev/null

one() {  # side index
  local side=$1 i=$2 t0 t1
  t0=$(date +%s.%N)
  (cd "$work/$side" && CI_JAX_CACHE_DIR= PYTHONPATH="$work/$side" "$py" -m ci_jax.cli run \
      --data-dir "$data" --out "$work/run-$side-$i" >"$work/log-$side-$i" 2>&1)
  t1=$(date +%s.%N)
  echo "$side $i $(echo "$t1 - $t0" | bc)" >>"$work/walls"
  echo "run $side $i: $(echo "$t1 - $t0" | bc) s" >&2
}

for ((i = 0; i < rounds; i++)); do
  if ((i % 2 == 0)); then one A "$i"; one B "$i"; else one B "$i"; one A "$i"; fi
done

"$py" - "$work" "$old" "$new" "$out_json" <<'EOF'
import json, statistics, subprocess, sys
from pathlib import Path
work, old, new, out = Path(sys.argv[1]), *sys.argv[2:]
runs = {"A": [], "B": []}
for line in (work / "walls").read_text().split("\n"):
    if line:
        side, i, wall = line.split()
        report = json.loads((work / f"run-{side}-{i}" / "report.json").read_text())
        base, ret = report["baseline"], report["retrained"]
        runs[side].append({"round": int(i), "wall_s": float(wall), "timings_s": report["timings_s"],
                           "baseline": [base["clean_acc"], base["asr"]], "retrained": [ret["clean_acc"], ret["asr"]]})
med = {s: statistics.median(r["wall_s"] for r in rs) for s, rs in runs.items()}
rev = lambda r: subprocess.run(["git", "rev-parse", "--short", r], capture_output=True, text=True).stdout.strip()
result = {"command": "ci-jax run --data-dir DATA --out FRESH_DIR (CI_JAX_CACHE_DIR empty)",
          "A": rev(old), "B": rev(new), "runs": runs, "median_wall_s": med, "ratio_B_over_A": med["B"] / med["A"]}
Path(out).write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({"median_wall_s": med, "ratio_B_over_A": round(med["B"] / med["A"], 4)}))
EOF
