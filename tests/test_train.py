"""Training (ci_jax.train): one epoch learns, the log, batches, predictions, resuming, divergence,
data-parallel training, and the lock two processes share."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ci_jax import train
from ci_jax.errors import UserError

from helpers import train_cfg, trainer, weights


def test_one_epoch_learns(small_ds, tmp_path):
    cfg = train_cfg()
    t = trainer(cfg, small_ds)
    before = t.accuracy(small_ds.x_test, small_ds.y_test)
    info = train.train(t, small_ds.x_train, small_ds.y_train, tmp_path / "ckpt", key="k", desc="test")
    assert not info["reused"] and info["images_per_s"] > 0
    after = t.accuracy(small_ds.x_test, small_ds.y_test)
    assert after > 0.8 > before


def test_steps_per_epoch_and_batch_checks():
    assert train.steps_per_epoch(512, 32) == 16 and train.steps_per_epoch(500, 48) == 11
    assert train.steps_per_epoch(0, 32) == 1  # one padded batch: empty outputs of the right shapes
    train.check_batch(32, "--train.batch_size", 32)
    with pytest.raises(UserError, match=r"--train.batch_size = 600 is larger than the 512 images it batches: "
                                        r"use at most 512"):
        train.check_batch(600, "--train.batch_size", 512)


def test_training_writes_its_log(small_ds, tmp_path):
    t = trainer(train_cfg({"train.epochs": 2, "train.batch_size": 16}), small_ds)
    train.train(t, small_ds.x_train, small_ds.y_train, tmp_path / "ckpt", key="k")
    log = train.read_log(tmp_path / "ckpt")
    steps = [e for e in log if "step" in e]
    epochs = [e for e in log if "mean_loss" in e]
    # 32 steps an epoch, a line every 25 steps of an epoch and at its end.
    assert [e["step"] for e in steps] == [25, 32, 57, 64] and [e["epoch"] for e in steps] == [0, 0, 1, 1]
    assert all(e["loss"] > 0 and e["lr"] > 0 and e["images_per_s"] > 0 for e in steps)
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["seconds"] > 0 for e in epochs)
    # Each line's loss is the mean of its steps (25, then 7): together they make the epoch's mean.
    for (first, rest), epoch in zip(zip(steps[::2], steps[1::2]), epochs):
        assert np.isclose((25 * first["loss"] + 7 * rest["loss"]) / 32, epoch["mean_loss"], rtol=1e-5)
    assert train.read_log(tmp_path / "nowhere") == []


def test_epoch_indices_cover_every_image_with_full_batches(small_ds):
    cfg = train_cfg({"train.batch_size": 48})
    t = trainer(cfg, small_ds)
    idx = np.asarray(t.epoch_indices(500, epoch=0))
    assert idx.shape == (11, 48)
    assert set(idx.ravel()) == set(range(500))
    np.testing.assert_array_equal(idx, np.asarray(t.epoch_indices(500, epoch=0)))
    assert not np.array_equal(idx, np.asarray(t.epoch_indices(500, epoch=1)))


def test_predict_pads_last_batch(small_ds):
    t = trainer(train_cfg(), small_ds)
    pred_a, feats_a = t.predict(small_ds.x_test[:100])
    t2 = trainer(train_cfg({"eval.batch_size": 8}), small_ds)
    pred_b, feats_b = t2.predict(small_ds.x_test[:100])
    assert pred_a.shape == (100,) and feats_a.shape == (100, 128)
    np.testing.assert_array_equal(pred_a, pred_b)
    np.testing.assert_allclose(feats_a, feats_b, rtol=1e-4, atol=1e-5)


def test_predict_can_return_the_logits(small_ds):
    t = trainer(train_cfg(), small_ds)
    pred, feats, logits = t.predict(small_ds.x_test[:70], logits=True)
    assert logits.shape == (70, small_ds.num_classes)
    np.testing.assert_array_equal(pred, logits.argmax(-1))
    np.testing.assert_array_equal(feats, t.predict(small_ds.x_test[:70])[1])


def test_checkpoint_round_trip_and_reuse(small_ds, tmp_path):
    cfg = train_cfg()
    t = trainer(cfg, small_ds)
    train.train(t, small_ds.x_train, small_ds.y_train, tmp_path / "ckpt", key="k")
    pred, feats = t.predict(small_ds.x_test)
    fresh = trainer(cfg, small_ds)
    info = train.train(fresh, small_ds.x_train, small_ds.y_train, tmp_path / "ckpt", key="k")
    assert info["reused"]
    pred2, feats2 = fresh.predict(small_ds.x_test)
    np.testing.assert_array_equal(pred, pred2)
    np.testing.assert_array_equal(feats, feats2)


def test_other_key_clears_stale_checkpoint(small_ds, tmp_path):
    cfg = train_cfg()
    train.train(trainer(cfg, small_ds), small_ds.x_train, small_ds.y_train, tmp_path / "ckpt", key="old")
    info = train.train(trainer(cfg, small_ds), small_ds.x_train, small_ds.y_train, tmp_path / "ckpt", key="new")
    assert not info["reused"] and info["resumed_from_epoch"] == 0


def test_interrupted_run_resumes_to_the_same_weights(small_ds, tmp_path, monkeypatch):
    cfg = train_cfg({"train.epochs": 2})
    straight = trainer(cfg, small_ds)
    train.train(straight, small_ds.x_train, small_ds.y_train, tmp_path / "a", key="k")

    real_fit = train.Trainer.fit_epoch

    def dies_in_second_epoch(self, x, y, epoch, desc, log=lambda entry: None):
        if epoch == 1:
            log({"step": 17, "epoch": 1, "loss": 9.0, "lr": 0.0, "images_per_s": 1.0})  # a line of the lost epoch
            raise KeyboardInterrupt
        return real_fit(self, x, y, epoch, desc, log)

    monkeypatch.setattr(train.Trainer, "fit_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train(trainer(cfg, small_ds), small_ds.x_train, small_ds.y_train, tmp_path / "b", key="k")
    monkeypatch.setattr(train.Trainer, "fit_epoch", real_fit)
    resumed = trainer(cfg, small_ds)
    info = train.train(resumed, small_ds.x_train, small_ds.y_train, tmp_path / "b", key="k")
    assert info["resumed_from_epoch"] == 1 and not info["reused"]
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # The log describes the checkpoint's own trajectory: the lost epoch's lines are gone.
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("loss", "images_per_s", "seconds", "mean_loss")}
                         for e in log]
    assert strip(train.read_log(tmp_path / "b")) == strip(train.read_log(tmp_path / "a"))


def test_batch_must_split_over_devices(small_ds, tmp_path):
    n = jax.device_count()
    if n == 1:
        pytest.skip("needs several devices")
    cfg = train_cfg({"train.batch_size": n * 8 + 1})
    with pytest.raises(UserError, match="does not split over"):
        train.train(trainer(cfg, small_ds), small_ds.x_train, small_ds.y_train, tmp_path / "c", key="k")


def test_divergence_is_reported_with_step_and_lr(small_ds, tmp_path):
    x = small_ds.x_train.copy()
    x[:] = np.nan
    cfg = train_cfg()
    with pytest.raises(UserError, match=r"diverged.*step \d+.*lr"):
        train.train(trainer(cfg, small_ds), x, small_ds.y_train, tmp_path / "d", key="k")


def test_huge_lr_stops_with_the_step_and_lr(small_ds, tmp_path):
    cfg = train_cfg({"train.lr": 1e30, "train.schedule": "constant"})
    with pytest.raises(UserError, match=r"diverged: loss is (nan|inf|-inf) at step \d+ \(lr 1e\+30, weight decay 0\.0\): "
                                        r"lower --train.lr"):
        train.train(trainer(cfg, small_ds), small_ds.x_train, small_ds.y_train, tmp_path / "d", key="k")
    assert not (tmp_path / "d" / "done.json").exists()


def test_inf_loss_stops_training_too(small_ds, tmp_path, monkeypatch):
    # An overflowing loss is +inf, not NaN; isfinite must catch it as well. Forced here, since a
    # real overflow usually turns into NaN a step later.
    import jax.numpy as jnp
    import optax

    monkeypatch.setattr(optax, "softmax_cross_entropy_with_integer_labels",
                        lambda logits, labels: jnp.full(labels.shape, jnp.inf))
    cfg = train_cfg({"train.lr": 0.5})
    with pytest.raises(UserError, match=r"loss is inf at step 15 \(lr 0\.5, weight decay 0\.0\)"):
        train.train(trainer(cfg, small_ds), small_ds.x_train, small_ds.y_train, tmp_path / "d", key="k")


def test_a_log_with_damaged_bytes_keeps_its_readable_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe{"step": 2}\n[1]\n{"step": 3, "epoch"\n{"step": 4}\n')
    assert train.read_log(tmp_path) == [{"step": 1}, {"step": 4}]


# One process per device count: XLA fixes the number of forced CPU devices when it starts.
_SHARDED_RUN = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
import jax, numpy as np
from flax import nnx
from ci_jax import config, data, models, train
assert jax.device_count() == int(sys.argv[1])


# ResNet-20's parts at a size that compiles in seconds: convolutions, BatchNorm (whose batch
# statistics the devices must share), the mean-pooled features, the head.
class BNNet(nnx.Module):

    def __init__(self, in_channels, num_classes, *, rngs, conv):
        self.conv1 = nnx.Conv(in_channels, 8, (3, 3), use_bias=False, conv_general_dilated=conv, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, use_bias=False, conv_general_dilated=conv, rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x_BHWC):
        x = nnx.relu(self.bn1(self.conv1(x_BHWC)))
        feats_BD = nnx.relu(self.bn2(self.conv2(x))).mean(axis=(1, 2))
        return self.head(feats_BD), feats_BD


models.register_model("bnnet", lambda c, k, seed, size, *, conv: BNNet(c, k, rngs=nnx.Rngs(seed), conv=conv))
ds = data.synthetic(n_train=128, n_test=72, seed=0)
# SGD, not Adam: Adam turns summation-order noise in near-zero gradients into lr-sized steps.
cfg = config.preset("fast", {"train.model": "bnnet", "train.epochs": 1, "train.batch_size": 16,
                             "eval.batch_size": 16, "train.optimizer": "sgd", "train.lr": 0.05})
t = train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes, steps_per_epoch=8)
x, y = jax.device_put((jax.numpy.asarray(ds.x_train), jax.numpy.asarray(ds.y_train)), t.replicated)
loss = t.fit_epoch(x, y, 0, "sharded")
pred, feats, logits = t.predict(ds.x_test, logits=True)
np.savez(sys.argv[2], loss=loss, pred=pred, feats=feats, logits=logits,
         params=np.concatenate([np.ravel(l) for l in jax.tree.leaves(t.model_state)]))
"""


def _sharded_run(devices: int, out) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CI_JAX_CPU_DEVICES")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))  # this checkout's ci_jax
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    subprocess.run([sys.executable, "-c", _SHARDED_RUN, str(devices), str(out)], env=env, check=True,
                   timeout=300, capture_output=True)
    with np.load(out) as z:
        return dict(z)


@pytest.mark.slow  # trains in two fresh processes
def test_four_devices_match_one(tmp_path):
    """Data-parallel training (BatchNorm statistics and gradients all-reduced), the features pass
    and predictions give the one-device results, up to float summation order."""
    one, four = _sharded_run(1, tmp_path / "one.npz"), _sharded_run(4, tmp_path / "four.npz")
    # Measured: loss 3e-5 relative, weights and features within 0.2 % of their largest value.
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-4)
    for k in ("params", "feats"):
        np.testing.assert_allclose(four[k], one[k], rtol=1e-3, atol=1e-2 * np.abs(one[k]).max())
    # Decisions agree wherever one device's is clear: its two largest logits further apart than the
    # weights' summation noise can move them (a near-tie went the other way in a CI run).
    top2 = np.sort(one["logits"], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2e-3 * np.abs(one["logits"]).max()
    assert clear.mean() > 0.75
    np.testing.assert_array_equal(four["pred"][clear], one["pred"][clear])
    np.testing.assert_array_equal(one["pred"], one["logits"].argmax(-1))


@pytest.mark.timing
def test_a_second_process_waits_for_the_first_and_reuses_its_model(small_ds, trained_dir, tmp_path):
    import threading

    from ci_jax import files

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    done = (ckpt / "done.json").read_text()
    (ckpt / "done.json").unlink()  # as if another process were still training it
    result = {}
    with files.exclusive(tmp_path / ".ckpt.lock"):  # ... and held its lock
        t = threading.Thread(target=lambda: result.update(
            train.train(trainer(train_cfg(), small_ds), small_ds.x_train, small_ds.y_train, ckpt, key="k")))
        t.start()
        t.join(timeout=2.0)
        assert t.is_alive() and not result  # blocked on the lock
        (ckpt / "done.json").write_text(done)  # the other process finishes
    t.join(timeout=120)
    assert result["reused"] is True and result["resumed_from_epoch"] == 1


def test_a_finished_model_is_reused_without_waiting_for_the_lock(small_ds, trained_dir, tmp_path):
    from ci_jax import files

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    with files.exclusive(tmp_path / ".ckpt.lock"):  # another process reusing it holds the lock
        info = train.train(trainer(train_cfg(), small_ds), small_ds.x_train, small_ds.y_train, ckpt, key="k")
    assert info["reused"] and info["seconds"] == 0.0


def test_predict_on_no_images_gives_empty_outputs_of_the_right_shapes(small_ds):
    t = trainer(train_cfg(), small_ds)
    pred, feats = t.predict(small_ds.x_test[:0])
    assert pred.shape == (0,) and feats.shape == (0, t.predict(small_ds.x_test[:1])[1].shape[1])
