"""Every attack's trigger on real test images: clean, triggered, and their difference, at the
settings of the benchmark (experiments/benchmark_v2.yaml's strengthened ones where it strengthens).

    python experiments/attack_examples.py --data-dir ../shared/data/mnist --out experiments/results/attacks_examples_mnist.png
"""

from __future__ import annotations

import argparse

import numpy as np

from ci_jax import attacks, config, data, plots

# The attacks as the benchmark runs them (see experiments/results/attacks/README.md for why).
SETTINGS = {
    "pixel": {}, "patch": {}, "blend": {}, "chessboard": {}, "static": {},
    "cross": {"attack.cross.pattern_seed": 11, "attack.cross.amplitude": 16 / 255},
    "fourpixel": {"attack.fourpixel.amplitude": 32 / 255},
    "sig": {"attack.sig.delta": 40 / 255}, "wanet": {}, "adaptive_blend": {}, "bpp": {}, "smooth": {},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="mnist", choices=data.DATASETS)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=6)
    args = p.parse_args()
    ds = data.load(args.dataset, args.data_dir)
    shown = {}
    for name, fields in SETTINGS.items():
        cfg = config.preset("default", {"attack.name": name, **fields})
        a = attacks.build(name, cfg.attack_settings(), attacks.Target(0, 2, 1, "first", 0))
        t = attacks.triggered_test_set(a, ds.x_test, ds.y_test, ds.num_classes)
        pick = np.arange(min(args.n, len(t.idx)))
        shown[name] = (ds.x_test[t.idx[pick]], t.x_NHWC[pick], None, None)
    plots.examples(args.out, shown, n=args.n)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
