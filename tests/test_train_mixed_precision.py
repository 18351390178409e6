"""train.dtype: bfloat16 computes the forward and backward passes in bf16 and keeps the parameters,
BatchNorm statistics and optimizer state in float32; float32, the default, is the program it always
was (the same model keys, bit-identical steps). Runs on the CPU (slowly in bf16)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ci_jax import config, data, models, train
from ci_jax.errors import UserError


@pytest.fixture(scope="module")
def ds():
    return data.synthetic(n_train=64, n_test=16, seed=0)


def _cfg(dtype="float32", **more):
    return config.preset("default", {"train.model": "cnn", "train.batch_size": 32, "train.dtype": dtype, **more})


def _trainer(cfg, ds):
    return train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes,
                         train.steps_per_epoch(len(ds.y_train), cfg.train.batch_size))


def _floats(tree):
    return {a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def _old_update(train_def, state, x_BHWC, y_B, lr):
    """train.update as it was before train.dtype (48034df), for the bit-for-bit comparison."""
    model, opt = nnx.merge(train_def, state)

    def loss_fn(m):
        logits_BK, _ = m(x_BHWC)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BK, y_B).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.opt_state.hyperparams["learning_rate"][...] = lr
    opt.update(model, grads)
    return nnx.state((model, opt)), loss


# -- float32: nothing changed -------------------------------------------------------------------


def test_float32_is_left_out_of_the_model_key_and_bfloat16_is_in_it():
    base = config.Config()
    assert base.train.dtype == "float32" and config.ADDED_LATER["dtype"] == "float32"
    assert "dtype" not in config.model_identity(base)["train"]
    assert config.model_key(base, "d") == "70ffba2524ec00ee"  # the default's key at 48034df
    bf16 = config.replace(base, {"train.dtype": "bfloat16"})
    assert config.model_identity(bf16)["train"]["dtype"] == "bfloat16"
    assert config.model_key(bf16, "d") != config.model_key(base, "d")


def test_an_unknown_dtype_is_refused():
    with pytest.raises(UserError, match="train.dtype"):
        config.replace(config.Config(), {"train.dtype": "float16"})


@pytest.mark.slow  # trains: three compiled steps
def test_float32_steps_are_those_of_before(ds):
    t = _trainer(_cfg(), ds)
    x, y = jax.device_put((ds.x_train, ds.y_train), t.replicated)
    idx_SB = t.epoch_indices(len(ds.y_train), 0)
    state0 = jax.tree.map(jnp.copy, t.state)
    losses = []
    for i in range(2):
        t.state, loss = t.train_step(t.state, x, y, idx_SB, i, t.lr_S, i)
        losses.append(float(loss))
    # The trainer's first two losses, as 48034df computed them on this CPU (bit-identical there).
    assert losses == pytest.approx([2.6688122749328613, 3.1502771377563477], rel=1e-6)

    # The new update and the old one: the same bits, step after step.
    new_fn = jax.jit(lambda s, xb, yb, lr: train.update(t.train_def, s, xb, yb, lr))
    old_fn = jax.jit(lambda s, xb, yb, lr: _old_update(t.train_def, s, xb, yb, lr))
    new, old = state0, jax.tree.map(jnp.copy, state0)
    for i in range(2):
        xb, yb, lr = x[idx_SB[i]], y[idx_SB[i]], t.lr_S[i]
        new, loss_new = new_fn(new, xb, yb, lr)
        old, loss_old = old_fn(old, xb, yb, lr)
        assert np.asarray(loss_new).tobytes() == np.asarray(loss_old).tobytes()
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float32_leaves_the_model_untouched():
    model = models.create("cnn", 1, 10, seed=0)
    before = nnx.graphdef(model)
    assert models.set_compute_dtype(model, "float32") is model and nnx.graphdef(model) == before
    assert model.conv1.dtype is None  # flax's default: the dtype of what it is given


# -- bfloat16 -----------------------------------------------------------------------------------


def _conv_dtypes(jaxpr) -> set:
    """The operand dtypes of every convolution in a jaxpr, nested calls included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found |= {str(v.aval.dtype) for v in eqn.invars}
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _conv_dtypes(inner)
    return found


def test_bfloat16_computes_in_bf16_and_stores_float32(ds):
    t = _trainer(_cfg("bfloat16"), ds)
    assert _floats(t.state) == {np.dtype(np.float32)}  # parameters and Adam's moments
    x, y = jnp.asarray(ds.x_train[:32]), jnp.asarray(ds.y_train[:32])
    step = jax.make_jaxpr(lambda s: train.update(t.train_def, s, x, y, 1e-3))(t.state)
    assert _conv_dtypes(step.jaxpr) == {"bfloat16"}  # forward and both gradients
    new_state, loss = jax.eval_shape(lambda s: train.update(t.train_def, s, x, y, 1e-3), t.state)
    assert loss.dtype == jnp.float32 and _floats(new_state) == {np.dtype(np.float32)}
    # The defenses' passes: the model as it was trained, in bf16; features and logits come back float32.
    fwd = jax.make_jaxpr(lambda s: train.forward(t.eval_def, s, x))(t.model_state)
    assert _conv_dtypes(fwd.jaxpr) == {"bfloat16"}
    pred, feats, logits = (o.dtype for o in fwd.out_avals)
    assert (pred, feats, logits) == (jnp.int32, jnp.float32, jnp.float32)


def test_bfloat16_checkpoints_like_float32(ds):
    named = lambda dtype: jax.tree.map(lambda a: (a.shape, a.dtype), _trainer(_cfg(dtype), ds).named_state())
    assert named("bfloat16") == named("float32")


def test_batchnorm_keeps_float32_statistics_under_bf16():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    m = models.set_compute_dtype(Tiny(nnx.Rngs(0)), "bfloat16")
    m.train()
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3)) * 3 + 2
    out = nnx.jit(lambda m, x: m(x))(m, x)
    assert out.dtype == jnp.bfloat16
    assert m.bn.mean[...].dtype == m.bn.var[...].dtype == m.conv.kernel[...].dtype == jnp.float32
    assert float(jnp.abs(m.bn.mean[...]).sum()) > 0  # updated from the batch


@pytest.mark.slow  # trains three epochs
def test_bfloat16_training_learns(ds):
    big = data.synthetic(n_train=256, n_test=128, seed=1)
    cfg = _cfg("bfloat16", **{"train.epochs": 3, "train.lr": 3e-3})
    t = _trainer(cfg, big)
    x, y = jax.device_put((big.x_train, big.y_train), t.replicated)
    before = t.accuracy(big.x_test, big.y_test)
    losses = [t.fit_epoch(x, y, e, "bf16") for e in range(3)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert _floats(t.state) == {np.dtype(np.float32)}
    pred, feats = t.predict(big.x_test)
    assert feats.dtype == np.float32
    after = float((pred == big.y_test).mean())
    assert after > 0.8 > before
