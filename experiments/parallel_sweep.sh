#!/usr/bin/env bash
# Runs all N shards of a sweep at once on this machine, then merges them. For one GPU that
# small-batch steps leave mostly idle, or a many-core host: each shard is its own process and
# owns whole baselines, so shards never train the same model.
#   experiments/parallel_sweep.sh SPEC OUT N [ci-jax sweep options, e.g. --data-dir DIR]
# CI_JAX overrides the command (default: ci-jax). Logs: OUT/shard-I.log.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 SPEC OUT N [ci-jax sweep options]" >&2
  exit 2
fi
spec=$1 out=$2 n=$3
shift 3
cmd=${CI_JAX:-ci-jax}
mkdir -p "$out"
# Each process takes GPU memory as it needs it instead of 75 % of the card up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
pids=()
# A stopped script stops its shards too (they resume where they were when rerun).
trap 'kill "${pids[@]}" 2>/dev/null; wait; exit 143' TERM INT
for ((i = 0; i < n; i++)); do
  $cmd sweep "$spec" --out "$out" --shard "$i/$n" "$@" >"$out/shard-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
$cmd merge "$out"
exit $status
