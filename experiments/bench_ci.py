"""Throughput of the CI stage on real MNIST: features pass, filtered pass, GMM/BIC, impurity.

    python experiments/bench_ci.py --data-dir ../shared/data/mnist [--run runs/mnist] --out bench.json

With --run, the trained baseline of that run directory is used (GMM time depends on the features);
without it, a freshly initialised model (pass throughput does not depend on the weights).
Compile time is measured separately from the steady-state passes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

from ci_jax import cli

cli._set_xla_flags()  # the same device setup as `ci-jax run`

import jax  # noqa: E402

from ci_jax import config, data, experiment, files, train  # noqa: E402
from ci_jax.defenses import ci  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--run", help="run directory whose baseline checkpoint to use")
    p.add_argument("--preset", default="default")
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--out", default="bench_ci.json")
    args = p.parse_args()

    cfg = config.preset(args.preset, eval_batch_size=args.eval_batch_size)
    ds = data.load(cfg.dataset, args.data_dir)
    poisoned, _ = experiment.prepare(cfg, ds)
    n = len(poisoned.y_N)
    trainer = train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes, math.ceil(n / cfg.batch_size))
    if args.run:
        key = config.fingerprint(cfg, config.TRAIN_FIELDS)
        info = train.train(trainer, poisoned.x_NHWC, poisoned.y_N, os.path.join(args.run, "baseline"), key)
        if not info["reused"]:
            raise SystemExit(f"{args.run} had no finished baseline for preset {args.preset}; it was trained now")
    blur = ci.make_filter(cfg.filter, cfg.filter_param, cfg.seed)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    b = cfg.eval_batch_size
    _, compile_feats = timed(lambda: trainer.predict(poisoned.x_NHWC[:b]))
    _, compile_blur = timed(lambda: trainer.predict(poisoned.x_NHWC[:b], transform=blur))
    (pred, feats), t_feats = timed(lambda: trainer.predict(poisoned.x_NHWC))
    (pred_blur, _), t_blur = timed(lambda: trainer.predict(poisoned.x_NHWC, transform=blur))
    res, t_ci = timed(lambda: ci.run(feats, pred, pred_blur, poisoned.y_N, ds.num_classes, cfg, poisoned.is_poison_N))
    result = {
        "model": cfg.model, "images": n, "eval_batch_size": b,
        "device": {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                   "count": jax.device_count(), "host": platform.processor() or platform.machine(),
                   "cores": os.cpu_count()},
        "weights": "trained baseline" if args.run else "random init",
        "compile_s": {"features": compile_feats, "filtered": compile_blur},
        "features_images_per_s": n / t_feats,
        "filtered_images_per_s": n / t_blur,
        "gmm_s": res.timings_s["gmm"], "impurity_s": res.timings_s["impurity"],
        "ci_stage_s": t_feats + t_blur + t_ci,
        "bic_search": cfg.bic_search, "k_per_class": [c["k"] for c in res.report["classes"]],
    }
    files.write_json(args.out, result)
    for k, v in result.items():
        print(f"{k:24s} {v}")


if __name__ == "__main__":
    main()
