#!/usr/bin/env bash
# ci-jax's device check: one command on a GPU machine, JSON out, inside 8 minutes on one H100.
#
#   experiments/device_check.sh [--quick] [DIR]
#
# Writes into DIR (else $OUT, the device tool's folder that comes back; else an error):
#   device_check.json          every part: status (ok | timeout | failed | skipped), exit code, seconds,
#                              its budget, the file it wrote; rewritten after each part
#   mnist_default_report.json  `ci-jax run` with the default preset on real MNIST (its report.json);
#                              cut short: mnist_default_metrics.jsonl, the training log so far
#   bench_resnets.json         `ci-jax bench`, ResNet-20 and ResNet-18 on MNIST at batch 16, plain
#                              and stacked (K = 1, 4, 8)
#   bench_cifar_resnet18.json  `ci-jax bench --preset paper`: ResNet-18 on synthetic CIFAR-shaped
#                              images, train and passes images/s in float32 and bfloat16, and the
#                              paper preset's whole run estimated from them
#   device_check.log           every part's output
# A part runs under `timeout` with its own budget (DEVICE_CHECK_BUDGET_<PART>, seconds); the budgets
# and the kill grace add up to under 8 minutes. A bench cut short leaves the stages it finished
# ("partial": true).
#
# MNIST comes from the working tree: $CI_JAX_MNIST_DIR, else shared/data/mnist in the repository
# (the device machine gets the checkout's shared/), else ../shared/data/mnist (beside a developer's
# checkout, which does not travel to the device).
#
# --quick: tiny sizes and the small CNN, so that the script itself can be checked on a CPU in a
# minute or two (tests/test_device_check.py); not a measurement.
# PYTHON: the interpreter (default python3, which holds JAX on the device machine); the repository
# is put on its PYTHONPATH, so ci-jax need not be installed.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

quick=0
dir=""
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "device_check: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) if [ -n "$dir" ]; then echo "device_check: one output directory, not '$dir' and '$arg'" >&2; exit 2; fi
           dir="$arg" ;;
    esac
done
dir="${dir:-${OUT:-}}"
if [ -z "$dir" ]; then
    echo "device_check: no output directory: give one (experiments/device_check.sh DIR) or set OUT" >&2
    exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"

mnist=""
for cand in ${CI_JAX_MNIST_DIR:+"$CI_JAX_MNIST_DIR"} "$repo/shared/data/mnist" "$repo/../shared/data/mnist"; do
    if [ -e "$cand/train-images-idx3-ubyte.gz" ] || [ -e "$cand/train-images-idx3-ubyte" ]; then
        mnist="$(cd "$cand" && pwd)"
        break
    fi
done
if [ -z "$mnist" ]; then
    echo "device_check: MNIST not found (no train-images-idx3-ubyte[.gz] in \$CI_JAX_MNIST_DIR, $repo/shared/data/mnist or $repo/../shared/data/mnist): copy the four IDX files into shared/data/mnist of the checkout, the folder that travels to the device machine" >&2
    exit 2
fi

if [ "$quick" = 1 ]; then
    b_pre=${DEVICE_CHECK_BUDGET_PREFLIGHT:-120}; b_mnist=${DEVICE_CHECK_BUDGET_MNIST:-300}
    b_bench=${DEVICE_CHECK_BUDGET_BENCH:-300}; b_cifar=${DEVICE_CHECK_BUDGET_CIFAR:-300}
    run_extra=(--preset fast --train.epochs 1 --train.batch_size 32 --eval.batch_size 64 --attack.n_poison 20)
    bench_sizes=(--quick --models cnn --batch-sizes 8 --eval-batch-sizes 16 --steps 2 --repeats 1
                 --pass-images 32 --gmm-images 300 --gmm-backends sklearn --stack 2)
    # The paper preset's batch, 32: its whole-run estimate counts the step at that batch.
    cifar_sizes=(--quick --models cnn --batch-sizes 32 --eval-batch-sizes 16 --steps 2 --repeats 1
                 --pass-images 32 --gmm-images 300 --gmm-model cnn --gmm-backends sklearn)
else
    # 30 + 160 + 170 + 100 s, plus 4 x 3 s of grace: 472 s at most.
    b_pre=${DEVICE_CHECK_BUDGET_PREFLIGHT:-30}; b_mnist=${DEVICE_CHECK_BUDGET_MNIST:-160}
    b_bench=${DEVICE_CHECK_BUDGET_BENCH:-170}; b_cifar=${DEVICE_CHECK_BUDGET_CIFAR:-100}
    run_extra=()
    # Batch 16, the default experiment's: the stacks show what K small models gain on one card.
    bench_sizes=(--models resnet20 resnet18 --batch-sizes 16 --eval-batch-sizes 512 --steps 20 --repeats 3
                 --pass-images 8192 --gmm-images 6000 --gmm-backends sklearn --stack 1 4 8)
    cifar_sizes=(--models resnet18 --batch-sizes 32 128 --eval-batch-sizes 512 --steps 20 --repeats 3
                 --pass-images 8192 --gmm-images 5000 --gmm-backends sklearn)
fi

for b in "$b_pre" "$b_mnist" "$b_bench" "$b_cifar"; do
    case "$b" in
        ''|*[!0-9]*|0) echo "device_check: a DEVICE_CHECK_BUDGET_* of '$b': expected whole seconds >= 1" >&2; exit 2 ;;
    esac
done

mkdir -p "$dir" || { echo "device_check: cannot create the output directory $dir" >&2; exit 2; }
dir="$(cd "$dir" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$dir/device_check.log"
summary="$dir/device_check.json"
: >"$log"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# A fresh compilation cache: every part compiles what it runs, as on a fresh machine.
export CI_JAX_CACHE_DIR="$work/xla"
grace=3  # seconds between timeout's SIGTERM (ci-jax ends cleanly on it) and its SIGKILL

started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
t_start=$(date +%s)
parts=""

json_str() {  # a JSON string literal of $1
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "${s//$'\n'/ }"
}

write_summary() {
    local tmp="$summary.tmp"
    {
        printf '{\n  "script": "experiments/device_check.sh",\n  "quick": %s,\n' "$([ "$quick" = 1 ] && echo true || echo false)"
        printf '  "started": "%s",\n  "seconds": %s,\n  "mnist_dir": %s,\n  "python": %s,\n' \
            "$started" "$(( $(date +%s) - t_start ))" "$(json_str "$mnist")" "$(json_str "$py")"
        printf '  "budget_s": %s,\n  "parts": [%s\n  ]\n}\n' "$((b_pre + b_mnist + b_bench + b_cifar + 4 * grace))" "$parts"
    } >"$tmp" && mv "$tmp" "$summary"
}

# part NAME BUDGET OUTPUT_FILE COMMAND...: runs COMMAND under its budget and records how it ended;
# OUTPUT_FILE (in the output directory) is recorded if it exists by then. Sets last_status.
part() {
    local name=$1 budget=$2 output=$3 rc t0 t1
    shift 3
    echo "== $name (budget ${budget} s): $*" >>"$log"
    t0=$(date +%s)
    # timeout signals the command's whole process group: ci-jax ends cleanly on SIGTERM.
    timeout --signal=TERM --kill-after="$grace" "$budget" "$@" >>"$log" 2>&1
    rc=$?
    t1=$(date +%s)
    case $rc in
        0) last_status=ok ;;
        124|137) last_status=timeout ;;
        *) last_status=failed ;;
    esac
    if [ "$name" = mnist_default_run ]; then collect_mnist; output=$mnist_output; fi
    [ -n "$output" ] && [ ! -e "$dir/$output" ] && output=""
    parts="$parts${parts:+,}
    {\"name\": \"$name\", \"status\": \"$last_status\", \"exit_code\": $rc, \"seconds\": $((t1 - t0)), \"budget_s\": $budget, \"output\": $(json_str "$output")}"
    write_summary
    echo "device_check: $name $last_status in $((t1 - t0)) s (budget $budget s)${output:+ -> $dir/$output}"
    if [ "$last_status" = failed ]; then
        tail -n 15 "$log" | sed 's/^/    /'
    fi
    return 0
}

# The run's report; a run cut short by its budget leaves its training log instead.
collect_mnist() {
    mnist_output=""
    if [ -e "$work/mnist_run/report.json" ]; then
        cp "$work/mnist_run/report.json" "$dir/mnist_default_report.json" && mnist_output=mnist_default_report.json
    elif [ -e "$work/mnist_run/baseline/metrics.jsonl" ]; then
        cp "$work/mnist_run/baseline/metrics.jsonl" "$dir/mnist_default_metrics.jsonl" &&
            mnist_output=mnist_default_metrics.jsonl
    fi
}

cli=("$py" -m ci_jax.cli)

part preflight "$b_pre" "" "$py" -c "import jax, flax, optax, orbax.checkpoint, sklearn, yaml, ci_jax.cli; \
d = jax.devices(); print('jax', jax.__version__, 'flax', flax.__version__, jax.default_backend(), len(d), d[0].device_kind)"
if [ "$last_status" != ok ]; then
    echo "device_check: $py cannot start JAX with ci-jax's dependencies (see $log); nothing else was run" >&2
    exit 1
fi
if [ "$quick" = 0 ] && ! grep -q '^jax .* gpu ' "$log"; then
    echo "device_check: JAX runs on no GPU here ($(grep '^jax ' "$log")): the figures will be this backend's"
fi

part mnist_default_run "$b_mnist" "" \
    "${cli[@]}" run --data-dir "$mnist" --out "$work/mnist_run" --no-plots "${run_extra[@]}"

part bench_resnets "$b_bench" bench_resnets.json \
    "${cli[@]}" bench --data-dir "$mnist" "${bench_sizes[@]}" --out "$dir/bench_resnets.json"

part bench_cifar_resnet18 "$b_cifar" bench_cifar_resnet18.json \
    "${cli[@]}" bench --preset paper --dataset cifar10 --dtypes float32 bfloat16 "${cifar_sizes[@]}" \
    --out "$dir/bench_cifar_resnet18.json"

echo "device_check: done in $(( $(date +%s) - t_start )) s -> $summary"
