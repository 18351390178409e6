"""Backend-specific kernels, chosen in one place and injected into the models (as flax's examples
inject `conv`): the architectures stay plain, and what only pays on one backend stays here.

On XLA:CPU a plain convolution is not the fastest way to run ResNet-20 (measurements in
experiments/results/README.md), so the CPU gets `cpu_conv`:
- the forward pass of a 1-input-channel convolution (the grayscale stem) as 9 shifted
  multiply-adds: XLA:CPU's convolution kernel runs it at a few GFLOP/s;
- a custom gradient that saves the convolution's input, so XLA does not fuse the BatchNorm/ReLU
  recompute into the layout transpose the kernel-gradient convolution needs (slower than the
  convolution itself there).
GPUs and TPUs run `jax.lax.conv_general_dilated` as it is.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata
from typing import Callable

import jax
import jax.numpy as jnp

ConvFn = Callable[..., jax.Array]  # the signature of lax.conv_general_dilated, as nnx.Conv calls it


def _lax_conv(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x_BHWC, w_HWIO, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tap_conv(x_BHWC: jax.Array, w_HWIO: jax.Array, padding) -> jax.Array:
    """Stride-1 convolution of a 1-channel x (I = 1, any O) as a sum of shifted copies of x."""
    kh, kw = w_HWIO.shape[:2]
    xp = jnp.pad(x_BHWC, ((0, 0), padding[0], padding[1], (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + xp[:, i:i + h, j:j + w, :] * w_HWIO[i, j, 0]
    return out


def _forward_conv(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    if w_HWIO.shape[2] == 1 and stride == 1:
        return tap_conv(x_BHWC, w_HWIO, padding)
    return _lax_conv(x_BHWC, w_HWIO, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    return _forward_conv(x_BHWC, w_HWIO, stride, padding)


def _conv_fwd(x_BHWC, w_HWIO, stride, padding):
    return _forward_conv(x_BHWC, w_HWIO, stride, padding), (x_BHWC, w_HWIO)


def _conv_bwd(stride, padding, res, g_BHWO):
    x_BHWC, w_HWIO = res
    _, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, stride, padding), x_BHWC, w_HWIO)
    return vjp(g_BHWO)


_conv.defvjp(_conv_fwd, _conv_bwd)


def cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **_) -> jax.Array:
    """Drop-in for lax.conv_general_dilated as nnx.Conv calls it (NHWC, HWIO, no dilation)."""
    if isinstance(padding, str):  # "SAME" / "VALID"
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return _conv(lhs, rhs, window_strides[0], tuple(tuple(int(q) for q in p) for p in padding))


def conv_for(backend: str) -> ConvFn:
    """The convolution the models use on `backend` ('cpu', 'gpu', 'tpu', ...)."""
    return cpu_conv if backend == "cpu" else jax.lax.conv_general_dilated


def conv() -> ConvFn:
    return conv_for(jax.default_backend())


# -- XLA flags: set by the entry points (the CLI, the test suite), never on import -----------------
_YNN = "--xla_cpu_experimental_ynn_fusion_type"


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


def xla_flags(cpu_devices: int = 1) -> str:
    """$XLA_FLAGS with what ci-jax needs added; a user's own setting of a flag wins.

    - jaxlib 0.10's XLA:CPU hands convolutions and dot fusions to YNNPACK, whose kernels ran
      ResNet-20 slower than Eigen's here; only that jaxlib line gets the flag (XLA aborts on a flag
      it does not know, and XLA_FLAGS reaches every backend).
    - cpu_devices > 1 splits the CPU into that many data-parallel devices.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    if _YNN not in flags and _jaxlib_version() == (0, 10):
        extra.append(f"{_YNN}=-individual_convolution,-dot")
    if cpu_devices > 1 and "xla_force_host_platform_device_count" not in flags:
        extra.append(f"--xla_force_host_platform_device_count={cpu_devices}")
    return " ".join([flags, *extra]).strip()
