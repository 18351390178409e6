"""Sweeps on a tiny synthetic MNIST: expansion, sharing, restart after kill -9, shards + merge."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ci_jax import config, sweep
from ci_jax.errors import UserError

BASE = dict(dataset="mnist", epochs=1, batch_size=32, eval_batch_size=128, n_poison=20, amplitude=1.0,
            k_max=3, covariance="diag")
SPEC = {"name": "tiny", "preset": "fast", "base": BASE, "grid": {"tau": [0.5, 1000.0]}, "seeds": [0, 1]}


@pytest.fixture(scope="module")
def data_dir(mnist_like_dir):
    return mnist_like_dir


def _spec_file(tmp_path, spec=SPEC, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_expand_orders_cases_grid_seeds_and_labels_columns():
    spec = sweep.expand({"cases": [{"case": "pixel"}, {"case": "patch", "trigger": "patch", "trigger_row": 2}],
                         "grid": {"defense": ["ci", "ss"]}, "seeds": [0, 1]})
    assert spec.fields == ("case", "trigger", "trigger_row", "defense")
    assert [(r.varied["case"], r.varied["defense"], r.cfg.seed) for r in spec.runs][:4] == [
        ("pixel", "ci", 0), ("pixel", "ci", 1), ("pixel", "ss", 0), ("pixel", "ss", 1)]
    assert len(spec.runs) == 8 and len({r.run_id for r in spec.runs}) == 8
    assert spec.runs[4].cfg.trigger == "patch" and spec.runs[0].varied["trigger"] == "pixel"


@pytest.mark.parametrize("bad,match", [
    ({"grid": {"tau": []}}, "grid.tau"),
    ({"grid": {"tua": [1.0]}}, "tua"),
    ({"grid": {"tau": [-1.0]}}, "tau"),
    ({"seeds": "0"}, "seeds"),
    ({"grid": {"seed": [1]}}, "seeds"),
    ({"colour": 1}, "colour"),
    ({"cases": []}, "cases"),
])
def test_bad_spec_is_one_user_error(bad, match):
    with pytest.raises(UserError, match=match):
        sweep.expand(bad)


def test_shards_partition_runs_by_baseline():
    spec = sweep.expand({"grid": {"tau": [0.1, 0.5, 1.0], "n_poison": [10, 20]}, "seeds": [0, 1, 2]})
    shards = [sweep.shard_runs(spec.runs, i, 4) for i in range(4)]
    ids = [r.run_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.run_id for r in spec.runs)
    key = lambda r: config.fingerprint(r.cfg, config.TRAIN_FIELDS)
    owners = [{key(r) for r in s} for s in shards]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    with pytest.raises(UserError, match="0 <= i < n"):
        sweep.parse_shard("4/4")


def test_python_spec(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text("SPEC = {'grid': {'tau': [0.5, 1.0]}, 'seeds': [0]}\n")
    assert len(sweep.expand(sweep.read_spec(path)).runs) == 2
    path.write_text("SPEC = 3\n")
    with pytest.raises(UserError, match="SPEC"):
        sweep.read_spec(path)


@pytest.fixture(scope="module")
def full_sweep(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    spec_path = _spec_file(out.parent)
    sweep.run(spec_path, out, data_dir=data_dir)
    return out, spec_path


def test_sweep_shares_baselines_and_writes_summary(full_sweep):
    out, _ = full_sweep
    rows = _rows(out / "results.csv")
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4
    assert len([d for d in (out / "baselines").iterdir() if d.is_dir()]) == 2  # one per seed, both taus
    for r in rows:  # tau 1000 removes nothing; tau 0.5 removes at least what it flags
        if float(r["tau"]) == 1000.0:
            assert r["removed"] == "0" and r["clean_after"] == r["clean_before"]
    summary = (out / "summary.md").read_text()
    assert "| tau | seeds |" in summary and summary.count("\n") == 4
    assert (out / "plots" / "tau.png").read_bytes().startswith(b"\x89PNG")


def test_restart_skips_finished_runs(full_sweep, data_dir):
    out, spec_path = full_sweep
    before = _rows(out / "results.csv")
    t0 = time.perf_counter()
    sweep.run(spec_path, out, data_dir=data_dir)
    assert _rows(out / "results.csv") == before
    assert time.perf_counter() - t0 < 30  # nothing trained: just the data and the summary


def test_two_shards_and_merge_equal_the_unsharded_sweep(full_sweep, data_dir, tmp_path):
    out, spec_path = full_sweep
    for i in range(2):
        sweep.run(spec_path, tmp_path, shard=(i, 2), data_dir=data_dir)
    assert not (tmp_path / "results.csv").exists()
    sweep.merge(tmp_path)
    assert _strip(_rows(tmp_path / "results.csv")) == _strip(_rows(out / "results.csv"))


def test_sweep_killed_with_sigkill_resumes_with_every_run_once(data_dir, tmp_path):
    spec_path = _spec_file(tmp_path, {**SPEC, "grid": {"tau": [0.5, 2.0, 1000.0]}, "seeds": [0]})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ci_jax.cli", "sweep", str(spec_path), "--out", str(out),
           "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    csv_path = out / "results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if csv_path.exists() and len(_rows(csv_path)) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(_rows(csv_path))
    assert 1 <= n_before < 3
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(csv_path)
    assert len(rows) == 3 and len({r["run_id"] for r in rows}) == 3
    assert not list(out.rglob("*.tmp"))
