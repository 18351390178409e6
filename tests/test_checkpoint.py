"""Checkpoints (ci_jax.checkpoint): a damaged directory is one error line that says to delete it, from
train.train and through the CLI (as a real process where the timing could matter); a directory of
another key or model, an unfinished save and a step without its sums are handled without losing a
finished model.

Through the CLI, whatever was damaged and whatever the timing: a restore that failed half-way used
to leave Orbax's and TensorStore's reads running, which printed tracebacks at exit around the error
line (issue 27); each step's files are now checked against their sums before any read starts."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ci_jax import checkpoint, cli, train
from ci_jax.errors import UserError

from helpers import finished_run_args, flip_a_bit, train_cfg, trainer, truncate, weights


# --- damaged checkpoint directories, in process (trained_dir: conftest.py) -------------------------


def _step_dir(ckpt):
    return ckpt / "orbax" / "1"


def _largest_file(ckpt):
    return max((p for p in _step_dir(ckpt).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _replace_by_a_file(path):
    shutil.rmtree(path)
    path.write_text("not a directory")


DAMAGE = {
    "weights_truncated": lambda c: truncate(_largest_file(c)),
    "weights_one_bit_flipped": lambda c: flip_a_bit(_largest_file(c)),
    "checkpoint_metadata_garbage": lambda c: (_step_dir(c) / "_CHECKPOINT_METADATA").write_text("{"),
    "step_dir_deleted": lambda c: shutil.rmtree(_step_dir(c)),
    "step_dir_replaced_by_a_file": lambda c: _replace_by_a_file(_step_dir(c)),
    "sums_garbage": lambda c: (c / "sums" / "1.json").write_bytes(b"\xff{"),
    "sums_not_an_object": lambda c: (c / "sums" / "1.json").write_text('{"files": []}'),
    "weights_deleted": lambda c: _largest_file(c).unlink(),
    "metadata_garbage": lambda c: next(_step_dir(c).rglob("_METADATA")).write_text("{garbage"),
    "manifest_truncated": lambda c: truncate(next(_step_dir(c).glob("*/manifest.ocdbt"))),
    "key_garbage": lambda c: (c / "key.json").write_bytes(b"\x00\xff{"),
    "key_not_an_object": lambda c: (c / "key.json").write_text("[1, 2]"),
    "key_missing": lambda c: (c / "key.json").unlink(),
    "done_garbage": lambda c: (c / "done.json").write_text('{"key": '),
    "done_other_key": lambda c: (c / "done.json").write_text('{"key": "other", "epochs": 1}'),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoint_is_one_user_error_saying_to_delete_it(small_ds, trained_dir, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    damage(ckpt)
    with pytest.raises(UserError) as e:
        train.train(trainer(train_cfg(), small_ds), small_ds.x_train, small_ds.y_train, ckpt, key="k")
    msg = str(e.value)
    assert f"checkpoint directory {ckpt} is damaged" in msg and "delete that directory" in msg
    assert "\n" not in msg and len(msg) < 500


def test_a_checkpoint_from_before_sums_without_its_tree_metadata_restores_the_same_weights(small_ds, trained_dir,
                                                                                             tmp_path):
    # A directory written by ci-jax 0.2 has no sums/: the model's own parameter tree is the restore
    # target, Orbax reads the arrays by name without the saved tree's _METADATA, and they are the
    # trained ones (no error is better than a rerun). Once restored, the step gets its sums.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    shutil.rmtree(ckpt / "sums")
    next(_step_dir(ckpt).rglob("_METADATA")).unlink()
    fresh, reference = trainer(train_cfg(), small_ds), trainer(train_cfg(), small_ds)
    assert train.train(fresh, small_ds.x_train, small_ds.y_train, ckpt, key="k")["reused"]
    train.train(reference, small_ds.x_train, small_ds.y_train, trained_dir, key="k")
    for a, b in zip(weights(fresh), weights(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (ckpt / "sums" / "1.json").is_file()
    checkpoint.verify(ckpt, 1)


def test_unfinished_save_beside_a_finished_step_is_ignored(small_ds, trained_dir, tmp_path):
    # A save killed midway leaves Orbax's temporary directory; Orbax lists only renamed
    # (finalized) steps, so the run goes on from the finished one.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    tmp_step = ckpt / "orbax" / "2.orbax-checkpoint-tmp-1234"
    shutil.copytree(_step_dir(ckpt), tmp_step)
    truncate(max((p for p in tmp_step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size))
    fresh = trainer(train_cfg(), small_ds)
    info = train.train(fresh, small_ds.x_train, small_ds.y_train, ckpt, key="k")
    assert info["reused"] and info["resumed_from_epoch"] == 1
    reference = trainer(train_cfg(), small_ds)
    train.train(reference, small_ds.x_train, small_ds.y_train, trained_dir, key="k")
    for a, b in zip(weights(fresh), weights(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_directory_of_another_key_is_moved_aside_unread_damaged_or_not(small_ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    truncate(_largest_file(ckpt))
    (ckpt / "key.json").write_text('{"key": "old"}')
    info = train.train(trainer(train_cfg(), small_ds), small_ds.x_train, small_ds.y_train, ckpt, key="k")
    assert info["resumed_from_epoch"] == 0 and not info["reused"]
    aside = checkpoint.shelved(ckpt, "old")
    assert aside.parent == tmp_path / "models" and (aside / "key.json").read_text() == '{"key": "old"}'


def test_another_setting_never_deletes_a_finished_model_and_switching_back_reuses_it(small_ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    other = trainer(train_cfg({"seed": 1}), small_ds)
    assert not train.train(other, small_ds.x_train, small_ds.y_train, ckpt, key="k-seed1")["reused"]
    assert checkpoint.finished(checkpoint.shelved(ckpt, "k"), "k")  # the first model, kept whole
    back = trainer(train_cfg(), small_ds)
    info = train.train(back, small_ds.x_train, small_ds.y_train, ckpt, key="k")
    assert info["reused"] and checkpoint.finished(ckpt, "k")
    assert checkpoint.finished(checkpoint.shelved(ckpt, "k-seed1"), "k-seed1")
    reference = trainer(train_cfg(), small_ds)
    train.train(reference, small_ds.x_train, small_ds.y_train, trained_dir, key="k")
    for a, b in zip(weights(back), weights(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_step_saved_but_never_summed_is_trained_again(small_ds, tmp_path):
    # Killed after Orbax finalised epoch 2 and before its sums were written: epoch 2 does not
    # count, training resumes from epoch 1 and saves epoch 2 anew.
    cfg = train_cfg({"train.epochs": 2})
    straight = trainer(cfg, small_ds)
    train.train(straight, small_ds.x_train, small_ds.y_train, tmp_path / "a", key="k")
    ckpt = tmp_path / "b"
    shutil.copytree(tmp_path / "a", ckpt)
    (ckpt / "done.json").unlink()
    (ckpt / "sums" / "2.json").rename(ckpt / "sums" / "1.json")  # stands for epoch 1's sums ...
    shutil.copytree(_step_dir(ckpt).parent / "2", _step_dir(ckpt))  # ... and epoch 1's step
    checkpoint.verify(ckpt, 1)
    resumed = trainer(cfg, small_ds)
    info = train.train(resumed, small_ds.x_train, small_ds.y_train, ckpt, key="k")
    assert info["resumed_from_epoch"] == 1 and not info["reused"]
    assert sorted(p.name for p in (ckpt / "orbax").iterdir() if p.name.isdigit()) == ["2"]
    assert sorted(p.name for p in (ckpt / "sums").iterdir()) == ["2.json"]
    checkpoint.verify(ckpt, 2)


# --- the named state, and a checkpoint of another model --------------------------------------------
def test_checkpoint_holds_the_named_state(small_ds, trained_dir):
    t = trainer(train_cfg(), small_ds)
    named = t.named_state()
    assert set(named) == {"model", "optimizer"}
    assert {"conv1", "conv2", "fc", "head"} <= set(named["model"])  # the cnn's layers, by name
    assert checkpoint.mismatch(named, named) is None
    t.load_named_state(named)  # a round trip through the named form
    train.train(t, small_ds.x_train, small_ds.y_train, trained_dir, key="k")  # reused: restored by name
    for a, b in zip(weights(t), jax.tree.leaves(named)):
        assert np.asarray(a).shape == np.asarray(b).shape


def test_mismatch_names_missing_extra_and_misshaped_parameters():
    want = {"model": {"conv": {"kernel": np.zeros((3, 3, 1, 16))}, "head": {"bias": np.zeros(10)}}}
    have = {"model": {"conv": {"kernel": np.zeros((3, 3, 1, 8))}, "fc": {"bias": np.zeros(10)}}}
    assert checkpoint.mismatch(want, have) == ("missing: model/head/bias; extra: model/fc/bias; "
                                          "mis-shaped: model/conv/kernel (3, 3, 1, 8) (model: (3, 3, 1, 16))")


def test_a_checkpoint_of_another_model_says_what_differs(small_ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)  # a finished cnn, key "k"
    other = trainer(train_cfg({"train.model": "resnet20"}), small_ds)
    with pytest.raises(UserError, match=r"holds a model that does not match resnet20's parameters \(missing: "
                                        r".*delete that directory") as e:
        train.train(other, small_ds.x_train, small_ds.y_train, ckpt, key="k")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) - len(str(ckpt)) < 600
    assert "mis-shaped: model/head/kernel (128, 10) (model: (64, 10))" in msg  # the cnn's head, resnet20's


def test_restoring_into_another_architecture_names_what_differs(small_ds, trained_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_dir, ckpt)
    other = trainer(train_cfg({"train.model": "resnet20"}), small_ds)
    with pytest.raises(UserError, match=r"does not match resnet20's parameters \(missing: .*extra: .*saved by other model code"):
        train.train(other, small_ds.x_train, small_ds.y_train, ckpt, key="k")


# --- through the CLI, over a copy of finished_run (conftest.py) ---------------------------------------
def _cmd(data_dir, out):
    return [sys.executable, "-m", "ci_jax.cli", *finished_run_args(data_dir, out)]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


def _step(run):
    return _step_dir(run / "baseline")


def _largest(run):
    return _largest_file(run / "baseline")


CLI_DAMAGE = {  # each kind of file Orbax writes for a step, and the step directory itself
    "array_data_truncated": lambda r: truncate(_largest(r)),
    "array_data_one_bit": lambda r: flip_a_bit(_largest(r)),
    "tree_metadata": lambda r: next(_step(r).rglob("_METADATA")).write_text("{garbage"),
    "array_metadatas": lambda r: truncate(next(p for p in _step(r).rglob("*") if p.parent.name == "array_metadatas")),
    "ocdbt_manifest": lambda r: truncate(next(_step(r).glob("*/manifest.ocdbt"))),
    "checkpoint_metadata": lambda r: (_step(r) / "_CHECKPOINT_METADATA").write_text("{"),
    "step_directory_deleted": lambda r: shutil.rmtree(_step(r)),
    "step_directory_emptied": lambda r: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(_step(r).iterdir())],
}
# As a real process where the damage is in the files Orbax and TensorStore read (a restore that
# failed there is what left reads running at exit); in this process, which is quicker, where the
# step's own metadata or directory is damaged and nothing is read.
AS_A_PROCESS = ["array_data_truncated", "array_data_one_bit", "tree_metadata", "array_metadatas", "ocdbt_manifest"]
IN_PROCESS = ["checkpoint_metadata", "step_directory_deleted", "step_directory_emptied"]


def _damaged_copy(finished_run, tmp_path, damage):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    damage(run)
    return run


def _one_line_and_exit_2(code, stderr, run, finished_run):
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s" not in line]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 2 and ": backend cpu, 1 device" in lines[0], stderr[-2000:]  # the start-up line
    lines = lines[1:]
    assert lines[0].startswith(f"ci-jax: error: checkpoint directory {run / 'baseline'} is damaged ("), lines[0]
    assert lines[0].endswith("delete that directory to train this model again from scratch"), lines[0]
    assert (run / "report.json").read_text() == (finished_run / "report.json").read_text()  # nothing lost


@pytest.mark.timing
@pytest.mark.parametrize("damage", [CLI_DAMAGE[k] for k in AS_A_PROCESS], ids=AS_A_PROCESS)
def test_a_damaged_checkpoint_through_the_cli_is_one_line_and_exit_2(finished_run, mnist_like_dir, tmp_path, damage):
    run = _damaged_copy(finished_run, tmp_path, damage)
    proc = subprocess.run(_cmd(mnist_like_dir, run), env=_env(), capture_output=True, text=True, timeout=600)
    _one_line_and_exit_2(proc.returncode, proc.stderr, run, finished_run)


@pytest.mark.parametrize("damage", [CLI_DAMAGE[k] for k in IN_PROCESS], ids=IN_PROCESS)
def test_a_damaged_checkpoint_through_the_cli_in_process_is_one_line_and_exit_2(finished_run, mnist_like_dir,
                                                                               tmp_path, damage, capsys):
    run = _damaged_copy(finished_run, tmp_path, damage)
    capsys.readouterr()
    code = cli.main(finished_run_args(mnist_like_dir, run))
    _one_line_and_exit_2(code, capsys.readouterr().err, run, finished_run)
