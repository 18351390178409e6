"""Host work in worker processes (ci_jax.parallel): order, errors, thread pools, and workers that die
with their parent."""

import os
import subprocess
import sys
import time

import pytest

from ci_jax import parallel

from helpers import fail_on_three, square_and_pid, thread_vars


def test_map_processes_keeps_the_order_and_runs_in_workers():
    out = parallel.map_processes(square_and_pid, [(i,) for i in range(6)], max_workers=2)
    assert [v for v, _ in out] == [i * i for i in range(6)]
    assert os.getpid() not in {pid for _, pid in out}
    # One item, or one worker: in this process.
    assert parallel.map_processes(square_and_pid, [(3,)])[0] == (9, os.getpid())
    assert {pid for _, pid in parallel.map_processes(square_and_pid, [(1,), (2,)], max_workers=1)} == {os.getpid()}
    assert parallel.map_processes(square_and_pid, []) == []
    # Small work (rows under INLINE_ROWS) stays here; at INLINE_ROWS it goes to the workers.
    small = parallel.map_processes(square_and_pid, [(1,), (2,)], max_workers=2, rows=parallel.INLINE_ROWS - 1)
    assert {pid for _, pid in small} == {os.getpid()}
    large = parallel.map_processes(square_and_pid, [(1,), (2,)], max_workers=2, rows=parallel.INLINE_ROWS)
    assert os.getpid() not in {pid for _, pid in large}


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
    seen = parallel.map_processes(thread_vars, [(0,), (1,)], max_workers=2)
    assert seen[0] == parallel.worker_env(2)


def test_map_processes_raises_what_a_worker_raised():
    with pytest.raises(ValueError, match="three"):
        parallel.map_processes(fail_on_three, [(i,) for i in range(5)], max_workers=2)
    # The pool is usable again afterwards.
    assert parallel.map_processes(fail_on_three, [(1,), (2,)], max_workers=2) == [1, 2]


def test_release_returns_once_the_queue_feeder_has_dropped_its_semaphores(monkeypatch):
    # The feeder thread of the closed call queue can outlive the shutdown; its end drops the queue's
    # last semaphores, which it then unlinks and reports to loky's resource tracker. A process that
    # os._exits in between leaves the tracker to report them as leaked, after our one line (a red
    # CI run). A busy machine's timing, forced: the feeder ends late and reports slowly, and this
    # thread reaches the finalizers in between.
    import multiprocessing.util
    import threading

    from joblib.externals.loky.backend import queues, resource_tracker

    feed, told, finalize = queues.Queue._feed, resource_tracker.unregister, multiprocessing.util._run_finalizers

    def late_feeder(*args: object) -> None:
        try:
            feed(*args)
        finally:
            time.sleep(0.2)

    def slow_on_the_feeder(name: str, rtype: str) -> None:
        if threading.current_thread().name == parallel.FEEDER_THREAD:
            time.sleep(0.5)
        told(name, rtype)

    def late(*args: int) -> None:
        time.sleep(0.4)
        finalize(*args)

    monkeypatch.setattr(queues.Queue, "_feed", staticmethod(late_feeder))
    monkeypatch.setattr(resource_tracker, "unregister", slow_on_the_feeder)
    monkeypatch.setattr(multiprocessing.util, "_run_finalizers", late)
    parallel.release()  # a pool of earlier tests, started without the late feeder
    assert parallel.map_processes(square_and_pid, [(1,), (2,)], max_workers=2)[1][0] == 4
    parallel.release()
    assert [t.name for t in threading.enumerate() if t.name == parallel.FEEDER_THREAD] == []


# -- 6: workers die with their parent ----------------------------------------------------------------
WORKER_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from ci_jax import parallel
def slow(i):
    time.sleep(120)
    return os.getpid()
if __name__ == "__main__":
    parallel.map_processes(slow, [(0,), (1,)], max_workers=2)
"""


@pytest.mark.timing
def test_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER_SCRIPT.format(root=os.getcwd()))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.time() + 60
        kids = []
        while time.time() < deadline and len(kids) < 2:
            out = subprocess.run(["ps", "-o", "pid=,ppid=", "-e"], capture_output=True, text=True).stdout
            kids = [int(p) for p, pp in (line.split() for line in out.splitlines()) if int(pp) == parent.pid]
            time.sleep(0.5)
        workers = [k for k in kids]
        assert workers, "no worker started"
    finally:
        parent.kill()
        parent.wait()
    # Each worker checks its parent every WATCH_S; a loaded machine may schedule it late, so wait
    # for the outcome rather than for a fixed time.
    deadline = time.time() + 60 * parallel.WATCH_S
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
