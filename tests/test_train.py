import shutil
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ci_jax import checkpoint, config, data, train
from ci_jax.errors import UserError


@pytest.fixture(scope="module")
def ds():
    return data.synthetic(n_train=512, n_test=256, seed=0)


def _cfg(overrides=None):
    """The fast preset for one epoch, with {dotted path: value} overrides."""
    return config.preset("fast", {"train.epochs": 1, "train.batch_size": 32, "eval.batch_size": 64,
                                  **(overrides or {})})


def _trainer(cfg, ds):
    return train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes,
                         train.steps_per_epoch(len(ds.y_train), cfg.train.batch_size))


def _weights(t):
    return jax.tree.leaves(t.named_state())


def test_one_epoch_learns(ds, tmp_path):
    cfg = _cfg()
    t = _trainer(cfg, ds)
    before = t.accuracy(ds.x_test, ds.y_test)
    info = train.train(t, ds.x_train, ds.y_train, tmp_path / "ckpt", key="k", desc="test")
    assert not info["reused"] and info["images_per_s"] > 0
    after = t.accuracy(ds.x_test, ds.y_test)
    assert after > 0.8 > before


def test_steps_per_epoch_and_batch_checks():
    assert train.steps_per_epoch(512, 32) == 16 and train.steps_per_epoch(500, 48) == 11
    assert train.steps_per_epoch(0, 32) == 1  # one padded batch: empty outputs of the right shapes
    train.check_batch(32, "--train.batch_size", 32)
    with pytest.raises(UserError, match=r"--train.batch_size = 600 is larger than the 512 images it batches: "
                                        r"use at most 512"):
        train.check_batch(600, "--train.batch_size", 512)


def test_training_writes_its_log(ds, tmp_path):
    t = _trainer(_cfg({"train.epochs": 2, "train.batch_size": 16}), ds)
    train.train(t, ds.x_train, ds.y_train, tmp_path / "ckpt", key="k")
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


def test_epoch_indices_cover_every_image_with_full_batches(ds):
    cfg = _cfg({"train.batch_size": 48})
    t = _trainer(cfg, ds)
    idx = np.asarray(t.epoch_indices(500, epoch=0))
    assert idx.shape == (11, 48)
    assert set(idx.ravel()) == set(range(500))
    np.testing.assert_array_equal(idx, np.asarray(t.epoch_indices(500, epoch=0)))
    assert not np.array_equal(idx, np.asarray(t.epoch_indices(500, epoch=1)))


def test_predict_pads_last_batch(ds):
    t = _trainer(_cfg(), ds)
    pred_a, feats_a = t.predict(ds.x_test[:100])
    t2 = _trainer(_cfg({"eval.batch_size": 8}), ds)
    pred_b, feats_b = t2.predict(ds.x_test[:100])
    assert pred_a.shape == (100,) and feats_a.shape == (100, 128)
    np.testing.assert_array_equal(pred_a, pred_b)
    np.testing.assert_allclose(feats_a, feats_b, rtol=1e-4, atol=1e-5)


def test_predict_can_return_the_logits(ds):
    t = _trainer(_cfg(), ds)
    pred, feats, logits = t.predict(ds.x_test[:70], logits=True)
    assert logits.shape == (70, ds.num_classes)
    np.testing.assert_array_equal(pred, logits.argmax(-1))
    np.testing.assert_array_equal(feats, t.predict(ds.x_test[:70])[1])


def test_checkpoint_round_trip_and_reuse(ds, tmp_path):
    cfg = _cfg()
    t = _trainer(cfg, ds)
    train.train(t, ds.x_train, ds.y_train, tmp_path / "ckpt", key="k")
    pred, feats = t.predict(ds.x_test)
    fresh = _trainer(cfg, ds)
    info = train.train(fresh, ds.x_train, ds.y_train, tmp_path / "ckpt", key="k")
    assert info["reused"]
    pred2, feats2 = fresh.predict(ds.x_test)
    np.testing.assert_array_equal(pred, pred2)
    np.testing.assert_array_equal(feats, feats2)


def test_other_key_clears_stale_checkpoint(ds, tmp_path):
    cfg = _cfg()
    train.train(_trainer(cfg, ds), ds.x_train, ds.y_train, tmp_path / "ckpt", key="old")
    info = train.train(_trainer(cfg, ds), ds.x_train, ds.y_train, tmp_path / "ckpt", key="new")
    assert not info["reused"] and info["resumed_from_epoch"] == 0


def test_interrupted_run_resumes_to_the_same_weights(ds, tmp_path, monkeypatch):
    cfg = _cfg({"train.epochs": 2})
    straight = _trainer(cfg, ds)
    train.train(straight, ds.x_train, ds.y_train, tmp_path / "a", key="k")

    real_fit = train.Trainer.fit_epoch

    def dies_in_second_epoch(self, x, y, epoch, desc, log=lambda entry: None):
        if epoch == 1:
            log({"step": 17, "epoch": 1, "loss": 9.0, "lr": 0.0, "images_per_s": 1.0})  # a line of the lost epoch
            raise KeyboardInterrupt
        return real_fit(self, x, y, epoch, desc, log)

    monkeypatch.setattr(train.Trainer, "fit_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train(_trainer(cfg, ds), ds.x_train, ds.y_train, tmp_path / "b", key="k")
    monkeypatch.setattr(train.Trainer, "fit_epoch", real_fit)
    resumed = _trainer(cfg, ds)
    info = train.train(resumed, ds.x_train, ds.y_train, tmp_path / "b", key="k")
    assert info["resumed_from_epoch"] == 1 and not info["reused"]
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # The log describes the checkpoint's own trajectory: the lost epoch's lines are gone.
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("loss", "images_per_s", "seconds", "mean_loss")}
                         for e in log]
    assert strip(train.read_log(tmp_path / "b")) == strip(train.read_log(tmp_path / "a"))


def test_batch_must_split_over_devices(ds, tmp_path):
    n = jax.device_count()
    if n == 1:
        pytest.skip("needs several devices")
    cfg = _cfg({"train.batch_size": n * 8 + 1})
    with pytest.raises(UserError, match="does not split over"):
        train.train(_trainer(cfg, ds), ds.x_train, ds.y_train, tmp_path / "c", key="k")


def test_divergence_is_reported_with_step_and_lr(ds, tmp_path):
    x = ds.x_train.copy()
    x[:] = np.nan
    cfg = _cfg()
    with pytest.raises(UserError, match=r"diverged.*step \d+.*lr"):
        train.train(_trainer(cfg, ds), x, ds.y_train, tmp_path / "d", key="k")


def test_huge_lr_stops_with_the_step_and_lr(ds, tmp_path):
    cfg = _cfg({"train.lr": 1e30, "train.schedule": "constant"})
    with pytest.raises(UserError, match=r"diverged: loss is (nan|inf|-inf) at step \d+ \(lr 1e\+30, weight decay 0\.0\): "
                                        r"lower --train.lr"):
        train.train(_trainer(cfg, ds), ds.x_train, ds.y_train, tmp_path / "d", key="k")
    assert not (tmp_path / "d" / "done.json").exists()


def test_inf_loss_stops_training_too(ds, tmp_path, monkeypatch):
    # An overflowing loss is +inf, not NaN; isfinite must catch it as well. Forced here, since a
    # real overflow usually turns into NaN a step later.
    import jax.numpy as jnp
    import optax

    monkeypatch.setattr(optax, "softmax_cross_entropy_with_integer_labels",
                        lambda logits, labels: jnp.full(labels.shape, jnp.inf))
    cfg = _cfg({"train.lr": 0.5})
    with pytest.raises(UserError, match=r"loss is inf at step 15 \(lr 0\.5, weight decay 0\.0\)"):
        train.train(_trainer(cfg, ds), ds.x_train, ds.y_train, tmp_path / "d", key="k")


# --- damaged checkpoint directories ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dir(ds, tmp_path_factory):
    """A finished one-epoch checkpoint directory, key "k"; copy it before damaging it."""
    path = tmp_path_factory.mktemp("trained") / "ckpt"
    train.train(_trainer(_cfg(), ds), ds.x_train, ds.y_train, path, key="k")
    return path


def _step_dir(ckpt):
    return ckpt / "orbax" / "1"


def _largest_file(ckpt):
    return max((p for p in _step_dir(ckpt).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _replace_by_a_file(path):
    shutil.rmtree(path)
    path.write_text("not a directory")


DAMAGE = {
    "weights_truncated": lambda c: _truncate(_largest_file(c)),
    "weights_one_bit_flipped": lambda c: _flip_a_byte(_largest_file(c)),
    "checkpoint_metadata_garbage": lambda c: (_step_dir(c) / "_CHECKPOINT_METADATA").write_text("{"),
    "step_dir_deleted": lambda c: shutil.rmtree(_step_dir(c)),
    "step_dir_replaced_by_a_file": lambda c: _replace_by_a_file(_step_dir(c)),
    "sums_garbage": lambda c: (c / "sums" / "1.json").write_bytes(b"\xff{"),
    "sums_not_an_object": lambda c: (c / "sums" / "1.json").write_text('{"files": []}'),
    "weights_deleted": lambda c: _largest_file(c).unlink(),
    "metadata_garbage": lambda c: next(_step_dir(c).rglob("_METADATA")).write_text("{garbage"),
    "manifest_truncated": lambda c: _truncate(next(_step_dir(c).glob("*/manifest.ocdbt"))),
    "key_garbage": lambda c: (c / "key.json").write_bytes(b"\x00\xff{"),
    "key_not_an_object": lambda c: (c / "key.json").write_text("[1, 2]"),
    "key_missing": lambda c: (c / "key.json").unlink(),
    "done_garbage": lambda c: (c / "done.json").write_text('{"key": '),
    "done_other_key": lambda c: (c / "done.json").write_text('{"key": "other", "epochs": 1}'),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoint_is_one_user_error_saying_to_delete_it(ds, trained_dir, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    damage(ckpt)
    with pytest.raises(UserError) as e:
        train.train(_trainer(_cfg(), ds), ds.x_train, ds.y_train, ckpt, key="k")
    msg = str(e.value)
    assert f"checkpoint directory {ckpt} is damaged" in msg and "delete that directory" in msg
    assert "\n" not in msg and len(msg) < 500


def test_a_checkpoint_from_before_sums_without_its_tree_metadata_restores_the_same_weights(ds, trained_dir, tmp_path):
    # A directory written by ci-jax 0.2 has no sums/: the model's own parameter tree is the restore
    # target, Orbax reads the arrays by name without the saved tree's _METADATA, and they are the
    # trained ones (no error is better than a rerun). Once restored, the step gets its sums.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    shutil.rmtree(ckpt / "sums")
    next(_step_dir(ckpt).rglob("_METADATA")).unlink()
    fresh, reference = _trainer(_cfg(), ds), _trainer(_cfg(), ds)
    assert train.train(fresh, ds.x_train, ds.y_train, ckpt, key="k")["reused"]
    train.train(reference, ds.x_train, ds.y_train, trained_dir, key="k")
    for a, b in zip(_weights(fresh), _weights(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (ckpt / "sums" / "1.json").is_file()
    checkpoint.verify(ckpt, 1)


def test_unfinished_save_beside_a_finished_step_is_ignored(ds, trained_dir, tmp_path):
    # A save killed midway leaves Orbax's temporary directory; Orbax lists only renamed
    # (finalized) steps, so the run goes on from the finished one.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    tmp_step = ckpt / "orbax" / "2.orbax-checkpoint-tmp-1234"
    shutil.copytree(_step_dir(ckpt), tmp_step)
    _truncate(max((p for p in tmp_step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))
    fresh = _trainer(_cfg(), ds)
    info = train.train(fresh, ds.x_train, ds.y_train, ckpt, key="k")
    assert info["reused"] and info["resumed_from_epoch"] == 1
    reference = _trainer(_cfg(), ds)
    train.train(reference, ds.x_train, ds.y_train, trained_dir, key="k")
    for a, b in zip(_weights(fresh), _weights(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_directory_of_another_key_is_moved_aside_unread_damaged_or_not(ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    _truncate(_largest_file(ckpt))
    (ckpt / "key.json").write_text('{"key": "old"}')
    info = train.train(_trainer(_cfg(), ds), ds.x_train, ds.y_train, ckpt, key="k")
    assert info["resumed_from_epoch"] == 0 and not info["reused"]
    aside = checkpoint.shelved(ckpt, "old")
    assert aside.parent == tmp_path / "models" and (aside / "key.json").read_text() == '{"key": "old"}'


def test_another_setting_never_deletes_a_finished_model_and_switching_back_reuses_it(ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    other = _trainer(_cfg({"seed": 1}), ds)
    assert not train.train(other, ds.x_train, ds.y_train, ckpt, key="k-seed1")["reused"]
    assert checkpoint.finished(checkpoint.shelved(ckpt, "k"), "k")  # the first model, kept whole
    back = _trainer(_cfg(), ds)
    info = train.train(back, ds.x_train, ds.y_train, ckpt, key="k")
    assert info["reused"] and checkpoint.finished(ckpt, "k")
    assert checkpoint.finished(checkpoint.shelved(ckpt, "k-seed1"), "k-seed1")
    reference = _trainer(_cfg(), ds)
    train.train(reference, ds.x_train, ds.y_train, trained_dir, key="k")
    for a, b in zip(_weights(back), _weights(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_step_saved_but_never_summed_is_trained_again(ds, tmp_path):
    # Killed after Orbax finalised epoch 2 and before its sums were written: epoch 2 does not
    # count, training resumes from epoch 1 and saves epoch 2 anew.
    cfg = _cfg({"train.epochs": 2})
    straight = _trainer(cfg, ds)
    train.train(straight, ds.x_train, ds.y_train, tmp_path / "a", key="k")
    ckpt = tmp_path / "b"
    shutil.copytree(tmp_path / "a", ckpt)
    (ckpt / "done.json").unlink()
    (ckpt / "sums" / "2.json").rename(ckpt / "sums" / "1.json")  # stands for epoch 1's sums ...
    shutil.copytree(_step_dir(ckpt).parent / "2", _step_dir(ckpt))  # ... and epoch 1's step
    checkpoint.verify(ckpt, 1)
    resumed = _trainer(cfg, ds)
    info = train.train(resumed, ds.x_train, ds.y_train, ckpt, key="k")
    assert info["resumed_from_epoch"] == 1 and not info["reused"]
    assert sorted(p.name for p in (ckpt / "orbax").iterdir() if p.name.isdigit()) == ["2"]
    assert sorted(p.name for p in (ckpt / "sums").iterdir()) == ["2.json"]
    checkpoint.verify(ckpt, 2)


def test_a_log_with_damaged_bytes_keeps_its_readable_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe{"step": 2}\n[1]\n{"step": 3, "epoch"\n{"step": 4}\n')
    assert train.read_log(tmp_path) == [{"step": 1}, {"step": 4}]


def test_checkpoint_holds_the_named_state(ds, trained_dir):
    t = _trainer(_cfg(), ds)
    named = t.named_state()
    assert set(named) == {"model", "optimizer"}
    assert {"conv1", "conv2", "fc", "head"} <= set(named["model"])  # the cnn's layers, by name
    assert checkpoint.mismatch(named, named) is None
    t.load_named_state(named)  # a round trip through the named form
    train.train(t, ds.x_train, ds.y_train, trained_dir, key="k")  # reused: restored by name
    for a, b in zip(_weights(t), jax.tree.leaves(named)):
        assert np.asarray(a).shape == np.asarray(b).shape


def test_mismatch_names_missing_extra_and_misshaped_parameters():
    want = {"model": {"conv": {"kernel": np.zeros((3, 3, 1, 16))}, "head": {"bias": np.zeros(10)}}}
    have = {"model": {"conv": {"kernel": np.zeros((3, 3, 1, 8))}, "fc": {"bias": np.zeros(10)}}}
    assert checkpoint.mismatch(want, have) == ("missing: model/head/bias; extra: model/fc/bias; "
                                          "mis-shaped: model/conv/kernel (3, 3, 1, 8) (model: (3, 3, 1, 16))")


def test_a_checkpoint_of_another_model_says_what_differs(ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)  # a finished cnn, key "k"
    other = _trainer(_cfg({"train.model": "resnet20"}), ds)
    with pytest.raises(UserError, match=r"holds a model that does not match resnet20's parameters \(missing: "
                                        r".*delete that directory") as e:
        train.train(other, ds.x_train, ds.y_train, ckpt, key="k")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) - len(str(ckpt)) < 600
    assert "mis-shaped: model/head/kernel (128, 10) (model: (64, 10))" in msg  # the cnn's head, resnet20's
# One process per device count: XLA fixes the number of forced CPU devices when it starts.
_SHARDED_RUN = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
import jax, numpy as np
from ci_jax import config, data, train
assert jax.device_count() == int(sys.argv[1])
ds = data.synthetic(n_train=128, n_test=72, seed=0)
# SGD, not Adam: Adam turns summation-order noise in near-zero gradients into lr-sized steps.
cfg = config.preset("fast", {"train.model": "resnet20", "train.epochs": 1, "train.batch_size": 16,
                             "eval.batch_size": 16, "train.optimizer": "sgd", "train.lr": 0.005})
t = train.Trainer(cfg, ds.x_train.shape[1:], ds.num_classes, steps_per_epoch=8)
x, y = jax.device_put((jax.numpy.asarray(ds.x_train), jax.numpy.asarray(ds.y_train)), t.replicated)
loss = t.fit_epoch(x, y, 0, "sharded")
pred, feats = t.predict(ds.x_test)
np.savez(sys.argv[2], loss=loss, pred=pred, feats=feats,
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


def test_four_devices_match_one(tmp_path):
    """Data-parallel training (BatchNorm statistics and gradients all-reduced), the features pass
    and predictions give the one-device results, up to float summation order."""
    one, four = _sharded_run(1, tmp_path / "one.npz"), _sharded_run(4, tmp_path / "four.npz")
    # Measured: loss 3e-5 relative, weights and features within 0.2 % of their largest value.
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-4)
    for k in ("params", "feats"):
        np.testing.assert_allclose(four[k], one[k], rtol=1e-3, atol=1e-2 * np.abs(one[k]).max())
    np.testing.assert_array_equal(four["pred"], one["pred"])


@pytest.mark.timing
def test_a_second_process_waits_for_the_first_and_reuses_its_model(ds, trained_dir, tmp_path):
    import threading

    from ci_jax import files

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    done = (ckpt / "done.json").read_text()
    (ckpt / "done.json").unlink()  # as if another process were still training it
    result = {}
    with files.exclusive(tmp_path / ".ckpt.lock"):  # ... and held its lock
        t = threading.Thread(target=lambda: result.update(
            train.train(_trainer(_cfg(), ds), ds.x_train, ds.y_train, ckpt, key="k")))
        t.start()
        t.join(timeout=2.0)
        assert t.is_alive() and not result  # blocked on the lock
        (ckpt / "done.json").write_text(done)  # the other process finishes
    t.join(timeout=120)
    assert result["reused"] is True and result["resumed_from_epoch"] == 1


def test_a_finished_model_is_reused_without_waiting_for_the_lock(ds, trained_dir, tmp_path):
    from ci_jax import files

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    with files.exclusive(tmp_path / ".ckpt.lock"):  # another process reusing it holds the lock
        info = train.train(_trainer(_cfg(), ds), ds.x_train, ds.y_train, ckpt, key="k")
    assert info["reused"] and info["seconds"] == 0.0


def test_predict_on_no_images_gives_empty_outputs_of_the_right_shapes(ds):
    t = _trainer(_cfg(), ds)
    pred, feats = t.predict(ds.x_test[:0])
    assert pred.shape == (0,) and feats.shape == (0, t.predict(ds.x_test[:1])[1].shape[1])


def test_restoring_into_another_architecture_names_what_differs(ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    other = train.Trainer(_cfg({"train.model": "resnet20"}), ds.x_train.shape[1:], ds.num_classes,
                          train.steps_per_epoch(len(ds.y_train), 32))
    with pytest.raises(UserError, match=r"does not match resnet20's parameters \(missing: .*extra: .*saved by other model code"):
        train.train(other, ds.x_train, ds.y_train, ckpt, key="k")
