"""Many models in one program: a stack gives what separate trainings give, resumes after kill -9,
and sweeps use it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ci_jax import config, stack, sweep, train

from helpers import ONE_EPOCH, make_cfg

pytestmark = pytest.mark.slow  # stacks train models

# Tolerances. SGD: the stacked step is the unstacked one vmapped, and matches to float rounding.
# Adam divides by the root of tiny second moments in its first steps, which amplifies rounding
# differences of the vmapped convolutions: parameters then agree to 0.05 and decisions exactly.
SGD_ATOL = 1e-5
ADAM_ATOL = 0.05


@pytest.fixture(scope="module")
def ds(synthetic_data):
    return synthetic_data(320, 64)  # as KILL_SCRIPT makes it


def _cfg(seed, **kw):
    return make_cfg(ONE_EPOCH, {"train.epochs": 2, "seed": seed}, kw)


KEEP = [np.arange(320), np.arange(320)[::2], np.arange(320)[64:]]  # three different training sets


def _params(t):
    return jax.tree.leaves(t.named_state()["model"])


def _solo(cfg, keep, ds, directory):
    t = train.Trainer(cfg, ds.x_train.shape[1:], 10, train.steps_per_epoch(len(keep), 32))
    train.train(t, ds.x_train[keep], ds.y_train[keep], directory, "solo")
    return t


def _stacked(cfgs, ds, root, keys=("a", "b", "c")):
    members = [stack.Member(c, k, root / key, key) for c, k, key in zip(cfgs, KEEP, keys)]
    infos = stack.train_members(members, ds.x_train, ds.y_train, ds.x_train.shape[1:], 10, max_stack=3)
    out = []
    for c, k, key in zip(cfgs, KEEP, keys):
        t = train.Trainer(c, ds.x_train.shape[1:], 10, train.steps_per_epoch(len(k), 32))
        assert train.train(t, ds.x_train[k], ds.y_train[k], root / key, key)["reused"]  # its own directory
        out.append(t)
    return out, infos


@pytest.mark.parametrize("optimizer,atol", [("sgd", SGD_ATOL), ("adam", ADAM_ATOL)])
def test_a_stack_of_three_with_different_training_sets_equals_three_separate_runs(ds, tmp_path, optimizer, atol):
    cfgs = [_cfg(s, **{"train.optimizer": optimizer, "train.lr": 0.01 if optimizer == "sgd" else 3e-3}) for s in (0, 1, 2)]
    stacked, infos = _stacked(cfgs, ds, tmp_path / "stack")
    assert all(i.get("stacked") == 3 for i in infos.values())
    for c, k, s, j in zip(cfgs, KEEP, stacked, range(3)):
        solo = _solo(c, k, ds, tmp_path / f"solo{j}")
        for a, b in zip(_params(solo), _params(s)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)
        assert np.array_equal(solo.predict(ds.x_test)[0], s.predict(ds.x_test)[0])
        log = train.read_log(tmp_path / "stack" / "abc"[j])
        assert [e["epoch"] for e in log if "mean_loss" in e] == [0, 1]
        # The lines of an epoch (each the mean of its steps since the last) make the epoch's mean.
        steps_per_epoch = train.steps_per_epoch(len(k), 32)
        for epoch in (0, 1):
            lines = [e for e in log if e.get("epoch") == epoch and "step" in e]
            sizes = np.diff([epoch * steps_per_epoch] + [e["step"] for e in lines])
            mean = next(e["mean_loss"] for e in log if e.get("epoch") == epoch and "mean_loss" in e)
            assert np.isclose(sum(n * e["loss"] for n, e in zip(sizes, lines)) / sizes.sum(), mean, rtol=1e-5)
        assert all(np.isfinite(e["loss"]) for e in log if "loss" in e)


def test_stacked_inference_equals_each_models_own(ds, tmp_path):
    cfgs = [_cfg(s) for s in (0, 1, 2)]
    stacked, _ = _stacked(cfgs, ds, tmp_path / "stack")
    idx_K = [np.arange(64), np.arange(20), np.arange(5, 64)]
    outs = stack.predict(stacked, ds.x_test, idx_K)
    for t, (pred, feats), idx in zip(stacked, outs, idx_K):
        p, f = t.predict(ds.x_test[idx])
        assert np.array_equal(pred, p)
        np.testing.assert_allclose(feats, f, rtol=1e-4, atol=1e-4)


KILL_SCRIPT = """
import sys
from pathlib import Path

import numpy as np
from ci_jax import kernels
import os
os.environ["XLA_FLAGS"] = kernels.xla_flags()
import jax
from ci_jax import config, data, stack, train
ds = data.synthetic(n_train=320, n_test=64, seed=0)
cfgs = [config.preset("fast", {"train.epochs": 2, "train.batch_size": 32, "eval.batch_size": 64, "seed": s,
                               "train.optimizer": "sgd", "train.lr": 0.01}) for s in (0, 1, 2)]
keep = [np.arange(320), np.arange(320)[::2], np.arange(320)[64:]]
root = Path(sys.argv[1])
members = [stack.Member(c, k, root / str(j), f"key{j}") for j, (c, k) in enumerate(zip(cfgs, keep))]
stack.train_members(members, ds.x_train, ds.y_train, ds.x_train.shape[1:], 10, 3)
out = {}
for j, (c, k) in enumerate(zip(cfgs, keep)):
    t = train.Trainer(c, ds.x_train.shape[1:], 10, train.steps_per_epoch(len(k), 32))
    train.train(t, ds.x_train[k], ds.y_train[k], root / str(j), f"key{j}")
    out[j] = [float(np.asarray(a).sum()) for a in jax.tree.leaves(t.named_state()["model"])]
print("RESULT " + __import__("json").dumps(out))
"""


def _script(tmp_path, root, kill=False):
    script = tmp_path / "k.py"
    script.write_text(KILL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "CI_JAX_KILL_AT"}
    env["PYTHONPATH"] = os.getcwd()
    if kill:
        env["CI_JAX_KILL_AT"] = "stack-epoch"
    return subprocess.run([sys.executable, str(script), str(root)], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.timing
def test_kill_9_during_a_stacked_training_then_restart_ends_with_the_same_models(tmp_path):
    whole = _script(tmp_path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _script(tmp_path, tmp_path / "killed", kill=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "0" / "done.json").exists()
    resumed = _script(tmp_path, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = lambda p: json.loads(p.stdout.split("RESULT ", 1)[1])
    assert result(resumed) == result(whole)
    log = train.read_log(tmp_path / "killed" / "1")
    assert [e["epoch"] for e in log if "mean_loss" in e] == [0, 1]


SPEC = {"name": "s", "preset": "fast",
        "base": {"attack.n_poison": 20, "train.batch_size": 32, "attack.pixel.amplitude": 1.0},
        "cases": [{"case": "none", "attack.name": "none"}, {"case": "pixel", "attack.name": "pixel"}],
        "grid": {"defense.name": ["ss"]}, "seeds": [0]}  # SS removes in every case: each baseline has a retrain


def test_a_stacked_sweep_gives_the_rows_of_an_unstacked_one(mnist_like_dir, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    rows = {}
    for k in (1, 4):
        csv_path = sweep.run(spec, tmp_path / f"k{k}", data_dir=mnist_like_dir, stack=k)
        rows[k] = [{c: v for c, v in r.items() if c != "seconds"} for r in sweep.read_rows(csv_path)]
    assert rows[1] == rows[4] and len(rows[1]) == 2 and all(int(r["removed"]) > 0 for r in rows[1])
    logs = [train.read_log(d) for d in (tmp_path / "k4" / "baselines").iterdir()]
    assert all(e.get("stack") == 2 for log in logs for e in log)  # the two baselines, one stack


def test_stack_key_is_every_train_field_but_the_learning_rate_and_its_schedule():
    import dataclasses

    base = config.preset("fast")
    assert stack.stack_key(base) == stack.stack_key(config.preset("fast", {"train.lr": 0.5, "train.schedule": "constant",
                                                                          "seed": 3}))
    for f in dataclasses.fields(base.train):  # a field added later keeps models that differ in it apart
        if f.name in stack.MAY_DIFFER:
            continue
        other = dataclasses.replace(base, train=dataclasses.replace(base.train, **{f.name: object()}))
        assert stack.stack_key(other) != stack.stack_key(base), f.name
    assert stack.stack_key(config.preset("fast", {"eval.batch_size": 32})) != stack.stack_key(base)
