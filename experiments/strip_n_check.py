"""Whether a smaller N of STRIP's blended passes changes what it finds: on a finished run, STRIP's
mean entropy of a seeded subsample of the training images (every poison up to a cap, and a random
sample of clean images) at N = `--blends` and at each smaller N of `--small`, with the ROC AUC and
the TPR at 1 % FPR of each and their differences to the large N in points (issue 22: under 2
points means the smaller N serves the grid).

Pass j draws the same overlays whatever N is (ci_jax/defenses/strip.py, overlay_indices), so a
smaller N is the first N passes of the large one and all come from one run of `--blends` passes.
Nothing is trained; the run's reserve (or --reserve test images held out, if it kept none) gives
the overlays.

    python experiments/strip_n_check.py --run runs/fair_mnist/pixel --data-dir /work/shared/data/mnist \\
        --small 16 32 --out experiments/results/fair_mnist/strip_n_check_pixel.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

import numpy as np  # noqa: E402

from ci_jax import experiment, files, metrics  # noqa: E402
from ci_jax.defenses import strip  # noqa: E402
from ci_jax.errors import UserError  # noqa: E402


def subsample(is_poison_N: np.ndarray, poison_cap: int, n_clean: int, seed: int) -> np.ndarray:
    """Sorted indices: every poison up to `poison_cap` (a seeded choice beyond it) and a seeded
    sample of `n_clean` clean images (all of them if there are fewer)."""
    rng = np.random.default_rng([seed, 22])
    poisons, clean = np.flatnonzero(is_poison_N), np.flatnonzero(~is_poison_N)
    if len(poisons) > poison_cap:
        poisons = rng.choice(poisons, poison_cap, replace=False)
    if len(clean) > n_clean:
        clean = rng.choice(clean, n_clean, replace=False)
    return np.sort(np.concatenate([poisons, clean]))


def scores_at(is_poison_N: np.ndarray, mean_H: np.ndarray) -> dict[str, Any]:
    """AUC and TPR at 1 % FPR of STRIP's score (lower entropy: more suspicious)."""
    return {"auc": metrics.roc_auc(is_poison_N, -mean_H), "tpr_at_1pct_fpr": metrics.tpr_at_fpr(is_poison_N, -mean_H, 0.01)}


def differences(large: dict[str, Any], small: dict[str, Any]) -> dict[str, float | None]:
    """small - large, in percentage points."""
    return {k: None if large[k] is None or small[k] is None else 100 * (small[k] - large[k]) for k in large}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished `ci-jax run` directory (an attack with poisons)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", default=None, help="for a sweep's run: the sweep's --models (or --out) directory")
    p.add_argument("--blends", type=int, default=100, help="the large N (default 100, the references')")
    p.add_argument("--small", type=int, nargs="+", default=[16], help="the smaller N to compare")
    p.add_argument("--poisons", type=int, default=1000, help="at most this many poisons")
    p.add_argument("--clean", type=int, default=2000, help="this many clean training images")
    p.add_argument("--reserve", type=int, default=1000, help="test images held out if the run kept none")
    p.add_argument("--seed", type=int, default=0, help="the subsample's seed (the overlays follow the run's seed)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not all(0 < n < args.blends for n in args.small):
        raise UserError(f"--small {args.small}: every N must be between 1 and --blends {args.blends} - 1")
    try:  # open_run says what is wrong with a run directory whose config cannot be read
        saved = files.read_json(Path(args.run) / "config.json")
    except (OSError, ValueError):
        saved = {}
    kept = isinstance(saved, dict) and isinstance(saved.get("eval"), dict) and saved["eval"].get("reserve", 0)
    overrides = {} if kept else {"eval.reserve": args.reserve}
    opened = experiment.open_run(args.run, data_dir=args.data_dir, overrides=overrides, models=args.models)
    view = opened.view
    r = view.need_reserve("strip")
    is_poison_N = opened.prepared.poisoned.is_poison_N
    idx = subsample(is_poison_N, args.poisons, args.clean, args.seed)
    truth_N = is_poison_N[idx]
    if not truth_N.any():
        raise UserError(f"--run {args.run}: its training set has no poisons to find")
    total, snapshots = np.zeros(len(idx)), {}
    t0 = time.perf_counter()
    for j, h in enumerate(strip.pass_entropies(view.predict, view.x_NHWC[idx], r.x_NHWC, args.blends,
                                               opened.cfg.seed, 0, desc="strip check"), start=1):
        total += h
        if j in args.small:
            snapshots[j] = total / j
    seconds = time.perf_counter() - t0
    large = scores_at(truth_N, total / args.blends)
    out: dict[str, Any] = {
        "run": str(args.run), "attack": opened.cfg.attack.name, "seed": args.seed,
        "images": {"poisons": int(truth_N.sum()), "clean": int((~truth_N).sum())},
        "reserve_images": int(len(r.y_N)), "seconds": seconds,
        "blended_images_per_s": len(idx) * args.blends / seconds if seconds > 0 else None,
        "large": {"blends": args.blends, **large}, "small": {}}
    for n, mean_H in sorted(snapshots.items()):
        small = scores_at(truth_N, mean_H)
        out["small"][str(n)] = {"blends": n, **small, "difference_points": differences(large, small)}
    files.write_json(args.out, out)
    print(out, flush=True)


if __name__ == "__main__":
    main()
