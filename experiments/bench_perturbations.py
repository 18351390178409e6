"""Each perturbation's pass, in images/s: the perturbation applied (an input transform over the whole
set, or a transformed copy of the model) and ResNet-20's batched forward on MNIST-shaped images.

A benchmark, not a test. The model is freshly initialised (speed does not depend on the weights),
the images random; each pass runs twice and the second, warm, run is timed (the first includes
compiling the transform, or the model copy, and is reported as first_call_s). Rates on a shared CPU
depend on what else runs: compare them within one run, against the plain forward pass (`none`).

    python experiments/bench_perturbations.py --out experiments/results/bench_cpu_perturbations.json
"""

from __future__ import annotations

import argparse
import os
import time

from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ci_jax import config, files, perturbations, train  # noqa: E402
from ci_jax.bench import device_info  # noqa: E402


def alone_s(t: train.Trainer, a: perturbations.Applied, x: np.ndarray) -> float:
    """Warm seconds of the perturbation by itself: the transform over the whole set, or the model copy."""
    if a.transform is not None:
        f, args = jax.jit(a.transform), (jnp.asarray(x),)
    elif a.model is not None:
        f, args = jax.jit(a.model, static_argnums=0), (t.eval_def, t.model_state)
    else:
        return 0.0
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="images per pass")
    p.add_argument("--eval-batch", type=int, default=256, help="batch size of the passes")
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = config.preset("default", {"eval.batch_size": args.eval_batch})
    t = train.Trainer(cfg, (28, 28, 1), 10, 1)
    x = np.random.default_rng(0).random((args.images, 28, 28, 1)).astype(np.float32)
    rows = []
    for name in ("none", *perturbations.NAMES):
        a = perturbations.Applied("none") if name == "none" else perturbations.make(name, seed=0)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            t.predict(x, a.transform, model=a.model)
            times.append(time.perf_counter() - t0)
        kind = "-" if name == "none" else perturbations.get(name).kind
        rows.append({"perturbation": name, "kind": kind, "pass": a.name, "images_per_s": args.images / times[1],
                     "first_call_s": times[0], "perturbation_alone_s": alone_s(t, a, x)})
        print(f"{a.name:32s} {kind:6s} {rows[-1]['images_per_s']:8.0f} images/s  (first call {times[0]:.2f} s, "
              f"the perturbation alone {rows[-1]['perturbation_alone_s'] * 1e3:.1f} ms)", flush=True)
    files.write_json(args.out, {"what": "each perturbation's pass (perturbation + forward), warm", "model": "resnet20",
                                "image_shape": [28, 28, 1], "images": args.images, "eval_batch": args.eval_batch,
                                "note": args.note, "device": device_info(), "rows": rows})


if __name__ == "__main__":
    main()
