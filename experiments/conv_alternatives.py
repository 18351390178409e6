"""Other ways to express ResNet-20's 3x3 convolutions in JAX, timed against XLA's own.

A benchmark, not a test: it backs the claim in experiments/results/README.md that on XLA:CPU no
rewrite of the convolution beats lax.conv_general_dilated. For each distinct convolution of
ResNet-20 and each batch size it times
  forward:      lax (XLA's kernel) vs Winograd F(2x2, 3x3) (4 multiplies per output instead of 9, but
                input/output transforms in memory), stride-1 shapes of even size only;
  kernel grad:  lax's VJP vs per-tap matmuls (9 dots contracting batch x space) vs one im2col dot.
Every alternative is checked against lax's result before it is timed.

    python experiments/conv_alternatives.py --out experiments/results/conv_alternatives_cpu.json
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import ci_jax  # noqa: F401  (its XLA flags must be set before JAX starts a backend)
from ci_jax import files
from ci_jax.bench import conv_stages, device_info, model_convs, seconds_per_call

G_43 = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)


def _shifted(x, s, ho, wo):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] for i in range(3) for j in range(3)]


def kgrad_taps(x, w, g, s):
    taps = _shifted(x, s, g.shape[1], g.shape[2])
    dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
    return jnp.stack([lax.dot_general(t, g, dims) for t in taps]).reshape(3, 3, x.shape[-1], g.shape[-1])


def kgrad_im2col(x, w, g, s):
    p = jnp.stack(_shifted(x, s, g.shape[1], g.shape[2]), axis=3)  # B, Ho, Wo, 9, Cin
    return lax.dot_general(p, g, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(3, 3, x.shape[-1], g.shape[-1])


def _bt(d0, d1, d2, d3):  # B^T of F(2x2, 3x3) applied along one axis
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def forward_winograd(x, w, s):
    """Stride-1 SAME 3x3 convolution by Winograd F(2x2, 3x3); H and W even."""
    b, h, wd, c = x.shape
    th, tw = h // 2, wd // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    v = []
    for t in _bt(*[xp[:, r:r + h - 1:2] for r in range(4)]):
        v.extend(_bt(*[t[:, :, q:q + wd - 1:2] for q in range(4)]))
    v = jnp.stack(v).reshape(16, b * th * tw, c)
    u = jnp.einsum("rk,klio,sl->rsio", G_43, w, G_43).reshape(16, c, -1)
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, b, th, tw, -1)
    r0, r1 = m[0] + m[1] + m[2], m[1] - m[2] - m[3]  # A^T along the first axis
    y = [[r[0] + r[1] + r[2], r[1] - r[2] - r[3]] for r in (r0, r1)]
    y = jnp.stack([jnp.stack(row, 3) for row in y], 2)  # B, th, 2, tw, 2, O
    return y.reshape(b, h, wd, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch_sizes:
        for c in model_convs("resnet20", b, (28, 28, 1), 10):  # the model's own convolutions
            s = c["params"]["window_strides"][0]
            x, w, g = (jnp.asarray(rng.standard_normal(c[k], np.float32)) for k in ("lhs", "rhs", "out"))
            row = {"batch": b, "h": c["lhs"][1], "cin": c["lhs"][3], "cout": c["rhs"][3], "stride": s}
            lax_fns = conv_stages(c["params"])
            cases = {"forward": ({"winograd": forward_winograd} if s == 1 and row["h"] % 2 == 0 else {}, (x, w)),
                     "kernel_grad": ({"taps": kgrad_taps, "im2col": kgrad_im2col}, (x, w, g))}
            for stage, (alts, a) in cases.items():
                ref = lax_fns[stage](*a)
                row[f"{stage}_lax_ms"] = 1e3 * seconds_per_call(lax_fns[stage], a, 5)
                for name, fn in alts.items():
                    jf = jax.jit(functools.partial(fn, s=s))
                    err = float(jnp.abs(jf(*a) - ref).max() / jnp.abs(ref).max())
                    if err > 1e-4:
                        raise SystemExit(f"{stage} {name} disagrees with lax: relative error {err:.1e}")
                    row[f"{stage}_{name}_ms"] = 1e3 * seconds_per_call(jf, a, 5)
            rows.append(row)
            print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    files.write_json(args.out, {"device": device_info(), "rows": rows})


if __name__ == "__main__":
    main()
