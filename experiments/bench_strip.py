"""STRIP's speed: blended images per second at N passes (ci_jax/defenses/strip.py, pass_entropies:
each pass blends every image with its own reserve image on the device and runs the model), and
what STRIP costs one MNIST cell at that rate: (60,000 training + the reserve's images) x N.

On a finished run's baseline (--run) or, without one, a randomly initialised model of the default
config on synthetic MNIST-shaped images (the speed does not depend on the weights). The first pass
(compilation) is timed apart.

    python experiments/bench_strip.py --run runs/mnist --data-dir /work/shared/data/mnist \\
        --blends 100 --images 2000 --out experiments/results/bench_strip_cpu.json
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

import numpy as np  # noqa: E402

from ci_jax import bench, config, data, experiment, files, train  # noqa: E402
from ci_jax.defenses import strip  # noqa: E402

MNIST_TRAIN = 60_000


def cell_cost(rate: float, blends: int, reserve: int, n_train: int = MNIST_TRAIN) -> dict[str, Any]:
    """Seconds STRIP takes one cell at `rate` blended images/s: N passes over the training set
    and the reserve."""
    images = (n_train + reserve) * blends
    return {"training_images": n_train, "reserve_images": reserve, "blended_images": images,
            "seconds": images / rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a finished `ci-jax run` directory (default: a random-init model)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", default=None, help="for a sweep's run: the sweep's --models (or --out) directory")
    p.add_argument("--blends", type=int, default=100, help="N, the passes timed")
    p.add_argument("--images", type=int, default=2000, help="images blended in each pass")
    p.add_argument("--reserve", type=int, default=1000, help="overlay images (and the reserve of a cell)")
    p.add_argument("--eval-batch", type=int, default=None, help="eval.batch_size (default: the run's or 64)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    overrides = {"eval.batch_size": args.eval_batch} if args.eval_batch else {}
    if args.run:
        opened = experiment.open_run(args.run, data_dir=args.data_dir, overrides=overrides, models=args.models)
        predict, x, eval_batch = opened.view.predict, opened.view.x_NHWC[:args.images], opened.cfg.eval.batch_size
        pool = opened.dataset.x_test[:args.reserve]
        source = f"trained baseline of {args.run} ({opened.cfg.train.model})"
    else:
        ds = data.synthetic(n_train=args.images, n_test=args.reserve, seed=0)
        cfg = config.preset("default", overrides)
        model = train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes, steps_per_epoch=1000)
        predict, x, pool, eval_batch = model.predict, ds.x_train, ds.x_test, cfg.eval.batch_size
        source = f"random-init {cfg.train.model}, synthetic 28x28x1"
    t0 = time.perf_counter()
    first = next(strip.pass_entropies(predict, x, pool, 1, 0, 9))  # compiles the blend and the forward
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    strip.mean_entropy(predict, x, pool, args.blends, 0, 0, desc="strip bench")
    seconds = time.perf_counter() - t0
    rate = len(x) * args.blends / seconds
    out = {"source": source, "device": bench.device_info(), "blends": args.blends, "images": int(len(x)),
           "overlay_pool": int(len(pool)), "eval_batch_size": eval_batch, "first_pass_s": first_s,
           "seconds": seconds, "blended_images_per_s": rate,
           "mnist_cell": cell_cost(rate, args.blends, args.reserve), "finite": bool(np.isfinite(first).all())}
    files.write_json(args.out, out)
    print(out, flush=True)


if __name__ == "__main__":
    main()
