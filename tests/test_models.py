"""The model registry's architectures (ci_jax.models): shapes, features, depth and the reference
parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import kernels, models
from ci_jax.errors import UserError


@pytest.mark.parametrize("name,channels,size,feat_dim", [
    ("resnet20", 1, 28, 64), ("resnet20", 3, 32, 64), ("cnn", 1, 28, 128), ("cnn", 3, 32, 128)])
def test_shapes(name, channels, size, feat_dim):
    def forward():
        model = models.create(name, channels, 10, seed=0, image_size=size)
        model.eval()
        return model(jnp.zeros((3, size, size, channels)))

    logits_BK, feats_BD = models.nnx.eval_shape(forward)  # traced: no weights drawn, nothing compiled
    assert logits_BK.shape == (3, 10)
    assert feats_BD.shape == (3, feat_dim)


def test_features_are_the_head_input():
    model = models.create("resnet20", 1, 10, seed=0)
    model.eval()
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    logits, feats = models.nnx.jit(lambda m, x: m(x))(model, x)  # one program, not one per op
    np.testing.assert_allclose(logits, model.head(feats), rtol=1e-6, atol=1e-6)


def test_resnet20_depth_and_option_a_shortcut():
    model = models.create("resnet20", 1, 10, seed=0)
    convs = [m for _, m in models.nnx.iter_modules(model) if isinstance(m, models.nnx.Conv)]
    assert len(convs) == 19  # + the linear head = 20 weighted layers
    block = model.blocks[3]  # first block of stage 2: 16 -> 32 channels, stride 2
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 16))
    shortcut = x[:, ::2, ::2, :]
    padded = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (8, 8)))
    # Zeroing the residual branch leaves relu(shortcut): subsampled input, zero channels around it.
    for bn in (block.bn2,):
        bn.scale[...] = jnp.zeros_like(bn.scale[...])
        bn.bias[...] = jnp.zeros_like(bn.bias[...])
    block.eval()
    np.testing.assert_allclose(block(x), jax.nn.relu(padded), atol=1e-6)


@pytest.mark.parametrize("name", models.MODELS)
def test_the_cpu_convolution_computes_what_lax_does(name):
    """The same architecture and weights with the injected CPU kernels or with lax's convolution."""
    x = jax.random.uniform(jax.random.key(4), (2, 28, 28, 1))
    ours = models.create(name, 1, 10, seed=0, conv=kernels.cpu_conv)
    plain = models.create(name, 1, 10, seed=0, conv=jax.lax.conv_general_dilated)
    ours.eval()
    plain.eval()
    for a, b in zip(ours(x), plain(x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_same_seed_same_init():
    a = models.create("cnn", 1, 10, seed=3)
    b = models.create("cnn", 1, 10, seed=3)
    c = models.create("cnn", 1, 10, seed=4)
    np.testing.assert_array_equal(a.conv1.kernel[...], b.conv1.kernel[...])
    assert not np.array_equal(a.conv1.kernel[...], c.conv1.kernel[...])


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'vgg'.*resnet20"):
        models.create("vgg", 1, 10, seed=0)


def _trainable(model) -> int:
    """Parameters a PyTorch count would call trainable: kernels, biases, BatchNorm scales and biases,
    not BatchNorm's running statistics."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(models.nnx.state(model, models.nnx.Param)))


@pytest.mark.parametrize("name, count", [
    # kuangliu/pytorch-cifar models/resnet.py ResNet18() for 10 classes: 11,173,962.
    ("resnet18", 11_173_962),
    # SCLBD/BackdoorBench models/preact_resnet.py PreActResNet18(num_classes=10): no BatchNorm after the
    # stem or the last block, bare 1x1 shortcut convs; the same count as kuangliu's PreActResNet18.
    # By hand: 11,173,962 - stem BN 128 - shortcut BNs (256 + 512 + 1024) + per-block pre-activation
    # BNs on the block input instead of after conv2 (only the first blocks of stages 2-4 differ:
    # 2 * (64 - 128) + 2 * (128 - 256) + 2 * (256 - 512) = -896) = 11,171,146.
    ("preact_resnet18", 11_171_146),
])
def test_resnet18_parameter_counts_are_the_references(name, count):
    assert 11_173_962 - 128 - (256 + 512 + 1024) - 896 == 11_171_146
    # Shapes only (nnx.eval_shape): initialising 11 M weights op by op is all a count would cost.
    model = models.nnx.eval_shape(lambda: models.create(name, 3, 10, seed=0, image_size=32))
    assert _trainable(model) == count


# One training step for ResNet-18 only: the only backward pass through the 32x32 ResNet-18 family's
# shapes (512 channels, the strided 1x1 shortcuts) anywhere in the suite; PreAct-ResNet-18 has the
# same convolutions, and its parameter count above pins its layers.
@pytest.mark.parametrize("name,step", [("resnet18", True), ("preact_resnet18", False)],
                         ids=["resnet18", "preact_resnet18"])
def test_resnet18_is_the_32x32_variant_and_trains_one_step(name, step):
    model = models.create(name, 3, 10, seed=0, image_size=32)
    stem = model.conv
    assert stem.kernel_size == (3, 3) and stem.strides == 1  # 3x3 stride-1 stem, no max-pool
    convs = [m for _, m in models.nnx.iter_modules(model) if isinstance(m, models.nnx.Conv)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 17 and len(convs) == 20  # + 3 shortcut 1x1s
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    y = jnp.array([1, 7])

    def loss(m):
        logits_BK, feats_BD = m(x)
        assert logits_BK.shape == (2, 10) and feats_BD.shape == (2, 512)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits_BK), y[:, None], 1).mean()

    if step:
        value, grads = models.nnx.jit(models.nnx.value_and_grad(loss))(model)  # one program: eager
        # dispatch of each op took twice as long
        assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    model.eval()
    logits, feats = model(x)
    assert logits.shape == (2, 10) and feats.shape == (2, 512)
    np.testing.assert_allclose(logits, model.head(feats), rtol=1e-5, atol=1e-5)


def test_resnet18_takes_any_channels_and_classes():
    def forward():
        model = models.create("preact_resnet18", 1, 43, seed=0, image_size=28)
        model.eval()
        return model(jnp.zeros((1, 28, 28, 1)))

    logits_BK, _ = models.nnx.eval_shape(forward)
    assert logits_BK.shape == (1, 43)
