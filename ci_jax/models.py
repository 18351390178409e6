"""Classifiers in Flax NNX. Every model maps x_BHWC to (logits_BK, feats_BD).

feats_BD is the input of the final linear layer: the penultimate features that the CI defense
clusters (the authors' choice, not the pre-residual-add hook of the public notebook).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from flax import nnx

from ci_jax.errors import UserError

MODELS: tuple[str, ...] = ("resnet20", "cnn")

_he_normal = nnx.initializers.he_normal()


def _lax_conv(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x_BHWC, w_HWIO, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tap_conv(x_BHWC: jax.Array, w_HWIO: jax.Array, padding) -> jax.Array:
    """Stride-1 convolution as a sum of shifted copies of x times the kernel's taps.

    For a 1-channel x (I = 1, any O), or any C with O = 1: the same kernel on every channel.
    """
    kh, kw = w_HWIO.shape[:2]
    xp = jnp.pad(x_BHWC, ((0, 0), padding[0], padding[1], (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            out = out + xp[:, i:i + h, j:j + w, :] * w_HWIO[i, j, 0]
    return out


def _forward_conv(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    # XLA:CPU's convolution kernel runs a 1-input-channel conv (the grayscale stem) at 3-6
    # GFLOP/s: at batch 64, with the BatchNorm and ReLU after it, 2.8 ms against 0.29 ms for the
    # taps (about 1 of 42 ms of the whole inference pass). Its kernel gradient stays a
    # convolution, the faster of the two there (0.32 against 0.98 ms at batch 32).
    if w_HWIO.shape[2] == 1 and stride == 1:
        return tap_conv(x_BHWC, w_HWIO, padding)
    return _lax_conv(x_BHWC, w_HWIO, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x_BHWC: jax.Array, w_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    return _forward_conv(x_BHWC, w_HWIO, stride, padding)


def _conv_fwd(x_BHWC, w_HWIO, stride, padding):
    # Saving x itself stops XLA from fusing the BatchNorm/ReLU recompute into the layout
    # transpose that the kernel-gradient convolution needs: on XLA:CPU that fusion took longer
    # than the convolution (profiled: ~190 of ~780 ms per ResNet-20 step at batch 128).
    return _forward_conv(x_BHWC, w_HWIO, stride, padding), (x_BHWC, w_HWIO)


def _conv_bwd(stride, padding, res, g_BHWO):
    x_BHWC, w_HWIO = res
    _, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, stride, padding), x_BHWC, w_HWIO)
    return vjp(g_BHWO)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **_):
    """Drop-in for lax.conv_general_dilated as nnx.Conv calls it (NHWC, HWIO, no dilation)."""
    return _conv(lhs, rhs, window_strides[0], tuple(tuple(p) for p in padding))


def _conv3x3(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=_he_normal, conv_general_dilated=_conv_general_dilated, rngs=rngs)


def _batch_norm(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # momentum 0.9 = PyTorch's default 0.1 running-average update, as in the reference ResNet-20.
    return nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 convs with an option-A shortcut (strided subsample + zero channel padding)."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride, rngs), _batch_norm(cout, rngs)
        self.conv2, self.bn2 = _conv3x3(cout, cout, 1, rngs), _batch_norm(cout, rngs)
        self.stride, self.pad = stride, cout - cin

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x_BHWC)))
        y = self.bn2(self.conv2(y))
        shortcut = x_BHWC[:, ::self.stride, ::self.stride, :]
        if self.pad:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
        return nnx.relu(y + shortcut)


class ResNet20(nnx.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 16-32-64 channels, 3 blocks per stage."""

    def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = _conv3x3(in_channels, 16, 1, rngs)
        self.bn = _batch_norm(16, rngs)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(64, num_classes, kernel_init=_he_normal, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nnx.relu(self.bn(self.conv(x_BHWC)))
        for block in self.blocks:
            x = block(x)
        feats_BD = x.mean(axis=(1, 2))
        return self.head(feats_BD), feats_BD


class SmallCNN(nnx.Module):
    """A LeNet-size CNN: fast enough for unit tests and quick ablations."""

    def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs, image_size: int = 28):
        self.conv1 = nnx.Conv(in_channels, 16, (5, 5), kernel_init=_he_normal, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (5, 5), kernel_init=_he_normal, rngs=rngs)
        side = image_size // 4
        self.fc = nnx.Linear(side * side * 32, 128, kernel_init=_he_normal, rngs=rngs)
        self.head = nnx.Linear(128, num_classes, kernel_init=_he_normal, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
        x = pool(nnx.relu(self.conv1(x_BHWC)))
        x = pool(nnx.relu(self.conv2(x)))
        feats_BD = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(feats_BD), feats_BD


def create(name: str, in_channels: int, num_classes: int, seed: int, image_size: int = 28) -> nnx.Module:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    rngs = nnx.Rngs(seed)
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, rngs=rngs, image_size=image_size)
    return ResNet20(in_channels, num_classes, rngs=rngs)
