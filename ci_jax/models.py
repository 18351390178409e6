"""Classifiers in Flax NNX. Every model maps x_BHWC to (logits_BK, feats_BD).

feats_BD is the input of the final linear layer: the penultimate features that the CI defense
clusters (the authors' choice, not the pre-residual-add hook of the public notebook).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from ci_jax import kernels
from ci_jax.kernels import ConvFn
from ci_jax.registry import Names, Registry


class ModelFactory(Protocol):
    """Builds a model, initialised from `seed`, for square images of `image_size` pixels with
    `in_channels` channels and `num_classes` classes, running its convolutions with `conv`."""

    def __call__(self, in_channels: int, num_classes: int, seed: int, image_size: int, *,
                 conv: ConvFn) -> nnx.Module: ...


_REGISTRY: Registry[ModelFactory] = Registry("model")
# Live: the config's choices for train.model, so a model registered later is accepted.
MODELS: Names = _REGISTRY.names


def register_model(name: str, factory: ModelFactory) -> None:
    """Makes `name` a model that `create`, the config and `ci-jax bench` accept."""
    _REGISTRY.register(name, factory)


def unregister_model(name: str) -> None:
    _REGISTRY.unregister(name)


def get_model(name: str) -> ModelFactory:
    """The factory of `name`; UserError with the nearest name for an unknown one."""
    return _REGISTRY.get(name)

_he_normal = nnx.initializers.he_normal()


def _conv3x3(cin: int, cout: int, stride: int, rngs: nnx.Rngs, conv: ConvFn) -> nnx.Conv:
    return nnx.Conv(cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=_he_normal, conv_general_dilated=conv, rngs=rngs)


def _batch_norm(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # momentum 0.9 = PyTorch's default 0.1 running-average update, as in the reference ResNet-20.
    return nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 convs with an option-A shortcut (strided subsample + zero channel padding)."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, conv: ConvFn):
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride, rngs, conv), _batch_norm(cout, rngs)
        self.conv2, self.bn2 = _conv3x3(cout, cout, 1, rngs, conv), _batch_norm(cout, rngs)
        self.stride, self.pad = stride, cout - cin

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x_BHWC)))
        y = self.bn2(self.conv2(y))
        shortcut = x_BHWC[:, ::self.stride, ::self.stride, :]
        if self.pad:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
        return nnx.relu(y + shortcut)


def _stages(block: Any, cin: int, stages: tuple[tuple[int, int], ...], per_stage: int, rngs: nnx.Rngs,
            conv: ConvFn) -> nnx.List:
    """A ResNet's residual stages: `per_stage` blocks of each (width, stride), the stride on the
    first block of a stage."""
    blocks = []
    for cout, stride in stages:
        for i in range(per_stage):
            blocks.append(block(cin, cout, stride if i == 0 else 1, rngs=rngs, conv=conv))
            cin = cout
    return nnx.List(blocks)


class ResNet20(nnx.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 16-32-64 channels, 3 blocks per stage."""

    def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs,
                 conv: ConvFn = jax.lax.conv_general_dilated):
        self.conv = _conv3x3(in_channels, 16, 1, rngs, conv)
        self.bn = _batch_norm(16, rngs)
        self.blocks = _stages(BasicBlock, 16, ((16, 1), (32, 2), (64, 2)), 3, rngs, conv)
        self.head = nnx.Linear(64, num_classes, kernel_init=_he_normal, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nnx.relu(self.bn(self.conv(x_BHWC)))
        for block in self.blocks:
            x = block(x)
        feats_BD = x.mean(axis=(1, 2))
        return self.head(feats_BD), feats_BD


def _conv1x1(cin: int, cout: int, stride: int, rngs: nnx.Rngs, conv: ConvFn) -> nnx.Conv:
    return nnx.Conv(cin, cout, (1, 1), strides=stride, padding=((0, 0), (0, 0)), use_bias=False,
                    kernel_init=_he_normal, conv_general_dilated=conv, rngs=rngs)


class ProjectionBlock(nnx.Module):
    """ResNet-18's basic block (kuangliu/pytorch-cifar's BasicBlock): two 3x3 convs, each followed
    by BatchNorm, and a 1x1 conv + BatchNorm shortcut where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, conv: ConvFn):
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride, rngs, conv), _batch_norm(cout, rngs)
        self.conv2, self.bn2 = _conv3x3(cout, cout, 1, rngs, conv), _batch_norm(cout, rngs)
        self.project = stride != 1 or cin != cout
        if self.project:
            self.short_conv, self.short_bn = _conv1x1(cin, cout, stride, rngs, conv), _batch_norm(cout, rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x_BHWC)))
        y = self.bn2(self.conv2(y))
        shortcut = self.short_bn(self.short_conv(x_BHWC)) if self.project else x_BHWC
        return nnx.relu(y + shortcut)


class PreActBlock(nnx.Module):
    """Pre-activation basic block (He et al. 2016b; BackdoorBench's PreActBlock): BN-ReLU before
    each conv, the shortcut a bare 1x1 conv of the activated input where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, conv: ConvFn):
        self.bn1, self.conv1 = _batch_norm(cin, rngs), _conv3x3(cin, cout, stride, rngs, conv)
        self.bn2, self.conv2 = _batch_norm(cout, rngs), _conv3x3(cout, cout, 1, rngs, conv)
        self.project = stride != 1 or cin != cout
        if self.project:
            self.short_conv = _conv1x1(cin, cout, stride, rngs, conv)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        a = nnx.relu(self.bn1(x_BHWC))
        shortcut = self.short_conv(a) if self.project else x_BHWC
        y = self.conv1(a)
        y = self.conv2(nnx.relu(self.bn2(y)))
        return y + shortcut


class ResNet18(nnx.Module):
    """ResNet-18 for 32x32 inputs (kuangliu/pytorch-cifar, backdoor-toolbox, the CI authors): a 3x3
    stride-1 stem and no max-pool, four stages of two blocks (64-128-256-512), global average pooling.

    `preact`: the pre-activation variant (BackdoorBench's PreActResNet18): no BN after the stem, and
    none after the last block either, so the features are the last block's sum, pooled.
    """

    def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs, preact: bool = False,
                 conv: ConvFn = jax.lax.conv_general_dilated):
        self.conv = _conv3x3(in_channels, 64, 1, rngs, conv)
        self.bn = None if preact else _batch_norm(64, rngs)
        block = PreActBlock if preact else ProjectionBlock
        self.blocks = _stages(block, 64, ((64, 1), (128, 2), (256, 2), (512, 2)), 2, rngs, conv)
        self.head = nnx.Linear(512, num_classes, kernel_init=_he_normal, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.conv(x_BHWC)
        if self.bn is not None:
            x = nnx.relu(self.bn(x))
        for block in self.blocks:
            x = block(x)
        # The references pool 4x4 maps with avg_pool2d(4) / AdaptiveAvgPool2d(1): at 32x32 both are
        # this mean, and it serves any image size.
        feats_BD = x.mean(axis=(1, 2))
        return self.head(feats_BD), feats_BD


class SmallCNN(nnx.Module):
    """A LeNet-size CNN: fast enough for unit tests and quick ablations."""

    def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs, image_size: int = 28,
                 conv: ConvFn = jax.lax.conv_general_dilated):
        self.conv1 = nnx.Conv(in_channels, 16, (5, 5), kernel_init=_he_normal, conv_general_dilated=conv, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (5, 5), kernel_init=_he_normal, conv_general_dilated=conv, rngs=rngs)
        side = image_size // 4
        self.fc = nnx.Linear(side * side * 32, 128, kernel_init=_he_normal, rngs=rngs)
        self.head = nnx.Linear(128, num_classes, kernel_init=_he_normal, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
        x = pool(nnx.relu(self.conv1(x_BHWC)))
        x = pool(nnx.relu(self.conv2(x)))
        feats_BD = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(feats_BD), feats_BD


def create(name: str, in_channels: int, num_classes: int, seed: int, image_size: int = 28,
           conv: ConvFn | None = None) -> nnx.Module:
    """The model `name`, initialised from `seed`; conv: the convolution to run (default: the one
    `kernels` chooses for the current backend). It carries `layer_order` (see `assignment_order`)."""
    model = get_model(name)(in_channels, num_classes, seed, image_size, conv=conv or kernels.conv())
    model.layer_order = assignment_order(model)
    return model


def assignment_order(model: nnx.Module) -> tuple[str, ...]:
    """The paths of the model's submodules ('blocks.0.bn1'), depth first, in the order their
    constructors assigned them: for the project's models the order the forward pass runs them (as
    PyTorch's model.modules()). nnx.split and merge rebuild a module with its attributes sorted by
    name, so `create` keeps this order on the model as `layer_order`, a static attribute (in the
    graph, not in the state: checkpoints do not change)."""
    out: list[str] = []

    def walk(node: nnx.Module, prefix: str) -> None:
        children = enumerate(node) if isinstance(node, nnx.List) else \
            ((k, v) for k, v in vars(node).items() if not k.startswith("_"))  # NNX's bookkeeping starts with _
        for key, child in children:
            if isinstance(child, nnx.Module):
                out.append(f"{prefix}{key}")
                walk(child, f"{prefix}{key}.")
    walk(model, "")
    return tuple(out)


# train.dtype's choices: the dtype the layers compute in. Parameters are stored in float32 either way.
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def set_compute_dtype(model: nnx.Module, dtype: str) -> nnx.Module:
    """Makes every flax layer of `model` compute in `dtype`: flax casts a layer's input and its
    parameters to its `dtype` at use, so the parameters stay float32 (the optimizer updates them
    there) while the convolutions and matmuls, forward and backward, run in `dtype`. BatchNorm
    computes its batch statistics in float32 whatever its `dtype` (flax's `_compute_stats`) and
    keeps its running averages in float32.

    A layer is a module with both `dtype` and `param_dtype` (every flax layer); a model's own
    jnp arithmetic follows the dtype of what it is given. float32 leaves the model untouched, so
    its programs are exactly those built before this setting existed.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype!r} is not one of {COMPUTE_DTYPES}")  # the config checks choices
    if dtype == "float32":
        return model
    target = jnp.dtype(dtype)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "dtype") and hasattr(node, "param_dtype"):
            node.dtype = target
    return model


def _resnet20(in_channels: int, num_classes: int, seed: int, image_size: int, *, conv: ConvFn) -> nnx.Module:
    # Global average pooling: any image size works, so image_size is not needed.
    return ResNet20(in_channels, num_classes, rngs=nnx.Rngs(seed), conv=conv)


def _cnn(in_channels: int, num_classes: int, seed: int, image_size: int, *, conv: ConvFn) -> nnx.Module:
    return SmallCNN(in_channels, num_classes, rngs=nnx.Rngs(seed), image_size=image_size, conv=conv)


def _resnet18(in_channels: int, num_classes: int, seed: int, image_size: int, *, conv: ConvFn) -> nnx.Module:
    return ResNet18(in_channels, num_classes, rngs=nnx.Rngs(seed), conv=conv)


def _preact_resnet18(in_channels: int, num_classes: int, seed: int, image_size: int, *, conv: ConvFn) -> nnx.Module:
    return ResNet18(in_channels, num_classes, rngs=nnx.Rngs(seed), preact=True, conv=conv)


register_model("resnet20", _resnet20)
register_model("cnn", _cnn)
register_model("resnet18", _resnet18)
register_model("preact_resnet18", _preact_resnet18)
