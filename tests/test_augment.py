"""Augmentation on the device: a seeded crop after zero padding and a flip where the dataset allows it,
inside the jitted step (plain and stacked); the passes never see it; off, the step is what it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ci_jax import augment, config, stack, train

from helpers import make_cfg


def _shifts(x_HWC: np.ndarray, pad: int, flip: bool) -> list[np.ndarray]:
    """Every image a crop of the zero-padded x (and its mirror, when flips are allowed) can give."""
    h, w, _ = x_HWC.shape
    padded = np.pad(x_HWC, ((pad, pad), (pad, pad), (0, 0)))
    crops = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + ([c[:, ::-1] for c in crops] if flip else [])


def test_crop_by_hand():
    # A 3x3 image, pad 1: each output is the image moved by at most one pixel, zeros coming in.
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
    outs = {augment.crop_flip(jnp.asarray(x), jax.random.key(k), 1, False)[0, :, :, 0].tobytes() for k in range(60)}
    moved_down_right = np.array([[0, 0, 0], [0, 1, 2], [0, 4, 5]], np.float32)  # offset (0, 0) of the padded image
    centred = x[0, :, :, 0]
    assert moved_down_right.tobytes() in outs and centred.tobytes() in outs
    assert len(outs) == 9  # 60 draws hit all 9 positions, and nothing else


@pytest.mark.parametrize("flip", [False, True])
def test_every_image_is_a_crop_of_itself_and_flips_only_where_allowed(flip):
    x = np.asarray(jax.random.uniform(jax.random.key(0), (64, 8, 8, 3)))
    out = np.asarray(augment.crop_flip(jnp.asarray(x), jax.random.key(1), 2, flip))
    mirrored = 0
    for img, o in zip(x, out):
        candidates = _shifts(img, 2, flip)
        match = [i for i, c in enumerate(candidates) if np.array_equal(c, o)]
        assert match, "not a crop of its own padded image"
        mirrored += match[0] >= 25
    assert (mirrored > 0) == flip and mirrored < 64


def test_draws_are_deterministic_from_seed_and_step():
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
    p = augment.Policy(4, True)
    a, b = augment.apply(p, x, 3, 7), augment.apply(p, x, 3, 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment.apply(p, x, 3, 8)) and not np.array_equal(a, augment.apply(p, x, 4, 7))
    assert augment.apply(None, x, 3, 7) is x  # off: the batch itself


def test_the_policy_follows_the_config_and_the_dataset():
    assert augment.policy("none", "cifar10") is None
    assert augment.policy("crop", "cifar10") == augment.Policy(4, False)
    assert augment.policy("dataset", "cifar10") == augment.Policy(4, True)
    assert augment.policy("dataset", "cifar100") == augment.Policy(4, True)
    for no_flip in ("gtsrb", "mnist", "fashion_mnist"):  # signs and digits: a mirror is another class
        assert augment.policy("dataset", no_flip) == augment.Policy(4, False)


def test_augment_is_in_the_model_key_only_when_on():
    base = config.preset("fast", {"data.dataset": "cifar10"})
    assert "augment" not in config.model_identity(base)["train"]  # models trained before keep their keys
    on = config.replace(base, {"train.augment": "dataset"})
    assert config.model_identity(on)["train"]["augment"] == "dataset"
    keys = {config.model_key(c, "d") for c in (base, on, config.replace(base, {"train.augment": "crop"}))}
    assert len(keys) == 3
    assert stack.stack_key(on) != stack.stack_key(base)  # never stacked together


def _cfg(aug: str, seed: int = 0):
    return make_cfg({"data.dataset": "cifar10", "train.batch_size": 8, "eval.batch_size": 8}, train__augment=aug,
                    seed=seed)


@pytest.fixture(scope="module")
def images():
    x = jax.random.uniform(jax.random.key(5), (24, 32, 32, 3))
    y = jnp.arange(24, dtype=jnp.int32) % 10
    return x, y


@pytest.mark.parametrize("aug", ["none", "dataset"])
def test_the_step_trains_on_the_augmented_batch_with_its_own_labels(images, aug):
    x, y = images
    t = train.Trainer(_cfg(aug), (32, 32, 3), 10, steps_per_epoch=3)
    idx_SB = t.epoch_indices(24, 1)
    before = jax.tree.map(jnp.copy, t.state)
    # Compiled, as the step is: run op by op, the reference update took most of the test's time.
    update = jax.jit(lambda s, x_B, y_B, lr: train.update(t.train_def, s, x_B, y_B, lr))
    # What the step must compute: the update on the batch as augmented from (seed, global step 4),
    # with the batch's labels untouched.
    x_B = augment.apply(augment.policy(aug, "cifar10"), x[idx_SB[1]], 0, 4)
    expected, loss = update(jax.tree.map(jnp.copy, before), x_B, y[idx_SB[1]], t.lr_S[4])
    got, got_loss = t.train_step(t.state, x, y, idx_SB, 1, t.lr_S, 4)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if aug == "dataset":  # and it is not the un-augmented update
        plain, plain_loss = update(jax.tree.map(jnp.copy, before), x[idx_SB[1]], y[idx_SB[1]], t.lr_S[4])
        assert not np.isclose(float(plain_loss), float(got_loss), rtol=1e-7, atol=0)


def test_passes_see_unaugmented_images(images):
    x, _ = images
    on, off = train.Trainer(_cfg("dataset"), (32, 32, 3), 10, 3), train.Trainer(_cfg("none"), (32, 32, 3), 10, 3)
    pred_on, feats_on = on.predict(np.asarray(x))
    pred_off, feats_off = off.predict(np.asarray(x))  # same seed: same initial weights
    np.testing.assert_array_equal(pred_on, pred_off)
    np.testing.assert_array_equal(feats_on, feats_off)


def test_a_stacked_member_draws_what_it_draws_alone(images, tmp_path):
    x, y = images
    members = [stack.Member(_cfg("dataset", seed=s), np.arange(24), tmp_path / str(s), str(s)) for s in (0, 1)]
    st = stack.Stack(members, (32, 32, 3), 10)
    idx_KSB = st.epoch_indices(1)
    state_K, loss_K = st.train_step(st.stacked_state(), x, y, idx_KSB, 2, jnp.asarray(st.steps_K), st.lr_KS, 1)
    for k, t in enumerate(st.trainers):
        alone, loss = t.train_step(t.state, x, y, idx_KSB[k], 2, t.lr_S, 1 * 3 + 2)
        np.testing.assert_allclose(loss_K[k], loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state_K), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[k], b, rtol=1e-4, atol=1e-5)
