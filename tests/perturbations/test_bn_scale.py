"""bn_scale (IBD-PSC's BatchNorm scaling) on a hand-built model: which layers, by how much, and the
output of a scaled layer computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ci_jax import config, models, perturbations, train
from ci_jax.errors import UserError
from ci_jax.perturbations import bn_scale


def _bn(scale, bias, rngs):
    bn = nnx.BatchNorm(2, use_running_average=True, epsilon=0.0, rngs=rngs)  # mean 0, var 1: gamma x + beta
    bn.scale[...] = jnp.asarray(scale, jnp.float32)
    bn.bias[...] = jnp.asarray(bias, jnp.float32)
    return bn


class TwoBN(nnx.Module):
    """features = bn_last(bn_first(the image's mean per channel)); assigned stem first, so that the
    forward order (stem, then a_last) is not the alphabetical one."""

    def __init__(self, in_channels=2, num_classes=2, seed=0, image_size=2, *, conv=None):
        rngs = nnx.Rngs(seed)
        self.stem = _bn([2.0, 3.0], [1.0, -1.0], rngs)
        self.a_last = _bn([1.0, 0.5], [0.0, 1.0], rngs)
        self.head = nnx.Linear(2, num_classes, rngs=rngs)

    def __call__(self, x_BHWC):
        feats_BD = self.a_last(self.stem(x_BHWC.mean((1, 2))))
        return self.head(feats_BD), feats_BD


def _two_bn():
    """TwoBN as `models.create` makes a model: carrying its layers' assignment order."""
    model = TwoBN()
    model.layer_order = models.assignment_order(model)
    return model


def _feats(model_fn, entry):
    gd, st = nnx.split(_two_bn())
    a = perturbations.make(entry)
    out = model_fn(a.model, gd, st)
    x = jnp.asarray(np.array([1.0, 2.0], np.float32).reshape(1, 1, 1, 2))
    return np.asarray(nnx.merge(gd, out)(x)[1][0]), st


@pytest.mark.parametrize("model_fn", [lambda f, gd, st: f(gd, st),
                                      lambda f, gd, st: jax.jit(f, static_argnums=0)(gd, st)], ids=["eager", "jit"])
def test_scaling_the_last_layer_scales_its_output_by_hand(model_fn):
    # Unscaled: stem [2*1 + 1, 3*2 - 1] = [3, 5]; a_last [1*3 + 0, 0.5*5 + 1] = [3, 3.5].
    feats, st = _feats(model_fn, "bn_scale@1")
    np.testing.assert_allclose(feats, [3.0, 3.5])
    # The last layer at 1.5: gamma and beta both 1.5 times: 1.5 * [3, 3.5].
    feats, st = _feats(model_fn, "bn_scale@1.5")
    np.testing.assert_allclose(feats, [4.5, 5.25], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(st["a_last"]["scale"][...]), [1.0, 0.5])  # the original stays


def test_two_layers_scale_the_stem_too():
    gd, st = nnx.split(_two_bn())
    out = bn_scale.scale_last(2, 1.5)(gd, st)
    # stem: 1.5 * [3, 5] = [4.5, 7.5]; a_last: 1.5 * [4.5, 0.5 * 7.5 + 1] = [6.75, 7.125].
    x = jnp.asarray(np.array([1.0, 2.0], np.float32).reshape(1, 1, 1, 2))
    np.testing.assert_allclose(np.asarray(nnx.merge(gd, out)(x)[1][0]), [6.75, 7.125], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["stem"]["bias"][...]), [1.5, -1.5])
    np.testing.assert_allclose(np.asarray(out["a_last"]["scale"][...]), [1.5, 0.75])
    # The running statistics and the head stay as they are.
    np.testing.assert_array_equal(np.asarray(out["a_last"]["var"][...]), [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(out["head"]["kernel"][...]), np.asarray(st["head"]["kernel"][...]))


def test_layers_are_counted_in_assignment_order_through_lists():
    m = _two_bn()
    assert m.layer_order == ("stem", "a_last", "head")
    assert [id(b) for b in bn_scale.bn_layers(m)] == [id(m.stem), id(m.a_last)]
    merged = nnx.merge(*nnx.split(m))  # merging sorts attributes by name; the order it carries stays
    assert [id(b) for b in bn_scale.bn_layers(merged)] == [id(merged.stem), id(merged.a_last)]
    bare = nnx.merge(*nnx.split(TwoBN()))  # without one: by name, a_last first
    assert [id(b) for b in bn_scale.bn_layers(bare)] == [id(bare.a_last), id(bare.stem)]
    # Shapes only (nnx.eval_shape): the layers' order needs no initialised weights.
    r20 = nnx.merge(*nnx.split(nnx.eval_shape(lambda: models.create("resnet20", 1, 10, 0))))
    bns = bn_scale.bn_layers(r20)
    assert len(bns) == 19 and bns[0] is r20.bn and bns[1] is r20.blocks[0].bn1 and bns[-1] is r20.blocks[8].bn2
    assert bn_scale.count_layers(*nnx.split(r20)) == 19
    assert bn_scale.count_layers(*nnx.split(models.create("cnn", 1, 10, 0))) == 0
    r18 = nnx.merge(*nnx.split(nnx.eval_shape(lambda: models.create("resnet18", 3, 10, 0))))
    b6, b7 = r18.blocks[6], r18.blocks[7]  # the last stage: a projection block, then a plain one
    bns = bn_scale.bn_layers(r18)
    assert len(bns) == 1 + 8 * 2 + 3 and bns[-5:] == [b6.bn1, b6.bn2, b6.short_bn, b7.bn1, b7.bn2]


def test_more_layers_than_the_model_has_is_a_user_error():
    gd, st = nnx.split(_two_bn())
    with pytest.raises(UserError, match="last 3 BatchNorm layers, but the model has 2"):
        bn_scale.scale_last(3, 1.5)(gd, st)


@pytest.fixture
def two_bn_model():
    models.register_model("two_bn_test", TwoBN)
    yield "two_bn_test"
    models.unregister_model("two_bn_test")


def test_trainer_predict_runs_the_scaled_copy_and_leaves_its_model(two_bn_model):
    cfg = config.preset("default", {"train.model": two_bn_model})
    t = train.Trainer(cfg, (1, 1, 2), 2, 1)
    x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], np.float32).reshape(3, 1, 1, 2)
    _, feats = t.predict(x)
    a = perturbations.make("bn_scale@2")
    _, feats2, logits2 = t.predict(x, model=a.model, logits=True)
    np.testing.assert_allclose(feats2, 2 * feats, rtol=1e-6)  # one layer: its whole output doubles
    assert logits2.shape == (3, 2)
    np.testing.assert_allclose(t.predict(x)[1], feats)  # the trainer's own model is untouched
