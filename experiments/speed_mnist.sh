#!/usr/bin/env bash
# The speed figures of the MNIST default job on this machine, against issue 2's targets: the whole
# run (<= 600 s), and over all 60,000 training images the features pass and the filtered pass
# (>= 1,500 images/s each, best of 3 full passes) and the CI stage (features, GMM, impurity: <= 120 s).
#   experiments/speed_mnist.sh [MNIST_DIR (../shared/data/mnist)] [OUT (runs/speed)]
# Writes OUT/run/ (the run, its report.json), OUT/bench.json and OUT/speed.json (the summary).
# CI_JAX overrides the command (default: ci-jax). A second call reuses OUT/run's models: delete OUT
# first for a fresh measurement.
set -euo pipefail
data=${1:-../shared/data/mnist} out=${2:-runs/speed}
cmd=${CI_JAX:-ci-jax}
$cmd run --data-dir "$data" --out "$out/run"
$cmd bench --models resnet20 --batch-sizes 16 --eval-batch-sizes 64 --pass-images 60000 \
  --data-dir "$data" --run "$out/run" --out "$out/bench.json"
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
report = json.load(open(os.path.join(out, "run", "report.json")))
run, ci = report["timings_s"], report["defense"]["timings_s"]
stages = json.load(open(os.path.join(out, "bench.json")))["stages"]
rate = {s["stage"]: s["images_per_s"] for s in stages if s["stage"] in ("features", "filtered")}
e2e = next(s for s in stages if s["stage"] == "end_to_end")
rows = [("run_total_s", run["total"], "<=", 600),
        ("run_ci_stage_s", run["features"] + ci["gmm"] + ci["filtered_passes"] + ci["impurity"], "<=", 120),
        ("bench_features_images_per_s", rate["features"], ">=", 1500),
        ("bench_filtered_images_per_s", rate["filtered"], ">=", 1500),
        ("bench_ci_stage_s", e2e["ci_stage_s"], "<=", 120)]
summary = {}
for name, value, op, target in rows:
    ok = value <= target if op == "<=" else value >= target
    summary[name] = {"value": value, "target": f"{op} {target}", "met": ok}
    print(f"{name:30s} {value:9.1f}  target {op} {target:<5}  {'met' if ok else 'NOT met'}")
tmp = os.path.join(out, "speed.json.tmp")
with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
os.replace(tmp, os.path.join(out, "speed.json"))
PY
