"""What is computed once and kept (ci_jax.cache), and host work in worker processes (ci_jax.parallel)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ci_jax import cache, parallel


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_npz_is_computed_once_per_key(tmp_path):
    path = tmp_path / "a.npz"
    compute, calls = _counting({"pred": np.arange(4)})
    first = cache.npz(path, "k", compute)
    again = cache.npz(path, "k", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["pred"], first["pred"])
    assert set(again) == {"pred"}  # the key is not one of the arrays
    cache.npz(path, "other", compute)  # another key: computed again and kept instead
    assert len(calls) == 2 and cache.load_npz(path, "k") is None and cache.load_npz(path, "other") is not None


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(b"garbage"),
                                    lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                                    lambda p: p.unlink()])
def test_a_damaged_npz_is_a_miss(tmp_path, damage):
    path = tmp_path / "a.npz"
    compute, calls = _counting({"pred": np.arange(4)})
    cache.npz(path, "k", compute)
    damage(path)
    np.testing.assert_array_equal(cache.npz(path, "k", compute)["pred"], np.arange(4))
    assert len(calls) == 2 and cache.load_npz(path, "k") is not None  # rewritten


def test_content_that_does_not_fit_is_a_miss(tmp_path):
    path = tmp_path / "a.npz"
    cache.npz(path, "k", lambda: {"pred": np.arange(4)})
    compute, calls = _counting({"pred": np.arange(5)})
    assert cache.npz(path, "k", compute, fits=lambda a: a["pred"].shape == (5,))["pred"].shape == (5,)
    assert cache.npz(path, "k", compute, fits=lambda a: a["missing"].size > 0)["pred"].shape == (5,)  # KeyError: a miss
    assert len(calls) == 2


def test_no_path_no_caching():
    compute, calls = _counting({"x": np.zeros(1)})
    cache.npz(None, "k", compute)
    cache.npz(None, "k", compute)
    assert cache.json_value(None, "k", lambda: {"a": 1}) == {"a": 1}
    assert len(calls) == 2


def test_json_value_is_computed_once_per_key_and_survives_damage(tmp_path):
    path = tmp_path / "gmm.json"
    compute, calls = _counting({"classes": [1, 2]})
    assert cache.json_value(path, "k", compute) == cache.json_value(path, "k", compute) == {"classes": [1, 2]}
    assert len(calls) == 1
    cache.json_value(path, "k2", compute)
    path.write_text('{"key": "k2", "val')  # cut short by a kill
    assert cache.json_value(path, "k2", compute) == {"classes": [1, 2]}
    assert cache.json_value(path, "k2", compute, fits=lambda v: len(v["classes"]) == 3) == {"classes": [1, 2]}
    assert len(calls) == 4
    assert not list(tmp_path.glob("*.tmp"))


def _square_and_pid(x):
    return x * x, os.getpid()


def _thread_vars(_):
    return {v: os.environ.get(v) for v in parallel.THREAD_VARS}


def _fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


def test_map_processes_keeps_the_order_and_runs_in_workers():
    out = parallel.map_processes(_square_and_pid, [(i,) for i in range(6)], max_workers=2)
    assert [v for v, _ in out] == [i * i for i in range(6)]
    assert os.getpid() not in {pid for _, pid in out}
    # One item, or one worker: in this process.
    assert parallel.map_processes(_square_and_pid, [(3,)])[0] == (9, os.getpid())
    assert {pid for _, pid in parallel.map_processes(_square_and_pid, [(1,), (2,)], max_workers=1)} == {os.getpid()}
    assert parallel.map_processes(_square_and_pid, []) == []


def test_workers_share_the_cores_out_among_their_blas_threads(monkeypatch):
    # n workers with every core's worth of BLAS threads each thrash the cores (the GMM stage ran
    # 5x slower so): as joblib's Parallel, each gets cores // n, and a user's own setting stands.
    monkeypatch.setattr(parallel, "workers", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    env = parallel.worker_env(2)
    assert env["OMP_NUM_THREADS"] == "4" and env["OPENBLAS_NUM_THREADS"] == "4" and env["MKL_NUM_THREADS"] == "3"
    assert parallel.worker_env(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.undo()
    seen = parallel.map_processes(_thread_vars, [(0,), (1,)], max_workers=2)
    assert seen[0] == parallel.worker_env(2)


def test_map_processes_raises_what_a_worker_raised():
    with pytest.raises(ValueError, match="three"):
        parallel.map_processes(_fail_on_three, [(i,) for i in range(5)], max_workers=2)
    # The pool is usable again afterwards.
    assert parallel.map_processes(_fail_on_three, [(1,), (2,)], max_workers=2) == [1, 2]


def test_shared_directories_lose_only_dead_writers_leftovers(tmp_path):
    from ci_jax import files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = tmp_path / f".x.npz.{os.getpid()}-abc.tmp"
    gone = tmp_path / f".x.npz.{int(dead.stdout)}-abc.tmp"
    for p in (mine, gone):
        p.write_text("partial")
    files.clear_stale_tmp(tmp_path, shared=True)
    assert mine.exists() and not gone.exists()
    files.clear_stale_tmp(tmp_path)
    assert not mine.exists()
