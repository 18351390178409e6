"""Independent host work (one mixture search per class) in worker processes that die with their
parent.

Workers come from joblib's loky executor: fresh interpreters (a fork of a process running JAX's
threads can deadlock) that need no `if __name__ == "__main__"` guard in the user's script. Each
worker watches its parent and exits within a second of the parent's death, so a parent ended by
SIGTERM or kill -9 leaves no worker behind (loky's own workers would idle on for minutes).
Each worker's BLAS and OpenMP pools get the cores divided by the workers, as joblib's Parallel
gives them: n workers each running every core's worth of BLAS threads thrash the cores.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing.util
import os
import threading
import time
from typing import Any, Callable, Sequence

from joblib.externals import loky
from tqdm.auto import tqdm

WATCH_S = 1.0
# joblib's list (joblib._parallel_backends.ParallelBackendBase.MAX_NUM_THREADS_VARS).
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# The name multiprocessing (and loky's copy) gives a queue's feeder thread.
FEEDER_THREAD = "QueueFeederThread"
FEEDER_JOIN_S = 5.0

_pool: Any = None  # the executor map_processes last used (loky reuses one across calls)


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(WATCH_S)


def _die_with_parent(parent: int) -> None:
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="ci-jax-watch-parent").start()


def workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_env(n_workers: int) -> dict[str, str]:
    """Thread limits for each of n workers: the cores shared out, unless the user set them."""
    share = str(max(1, workers() // n_workers))
    return {var: os.environ.get(var, share) for var in THREAD_VARS}


# Below this many rows in all, per-class host work runs in this process: starting the workers (each
# a fresh interpreter importing scikit-learn) costs more than fitting a few thousand points.
INLINE_ROWS = 5000


def map_processes(fn: Callable[..., Any], args: Sequence[tuple], max_workers: int | None = None,
                  desc: str | None = None, rows: int | None = None) -> list[Any]:
    """[fn(*a) for a in args], in parallel worker processes; in this process when there is one
    item or one core, or when `rows` (the work's size, given by the caller) is under INLINE_ROWS.
    desc: a progress bar of that name, an item a step (a per-class mixture search can take a
    minute: a stage that long is never silent)."""
    n = 1 if rows is not None and rows < INLINE_ROWS else min(len(args), max_workers or workers())
    with tqdm(total=len(args), desc=desc, disable=desc is None, leave=False, unit="class") as bar:
        if n <= 1:
            out = []
            for a in args:
                out.append(fn(*a))
                bar.update()
            return out
        global _pool
        pool = _pool = loky.get_reusable_executor(max_workers=n, initializer=_die_with_parent,
                                                  initargs=(os.getpid(),), env=worker_env(n))
        futures = [pool.submit(fn, *a) for a in args]
        try:
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                bar.update(len(done))
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=False, kill_workers=True)  # an interrupt must not wait for a 20-second fit
            raise


def release() -> None:
    """Kills the workers and releases the semaphores this process shares with them, for a process
    about to end by os._exit (an interrupt): that skips multiprocessing's exit hook, and loky's
    resource tracker, which outlives us, would then warn on our stderr of "leaked semlock objects"
    (and unlink them itself)."""
    if _pool is not None:
        _pool.shutdown(wait=True, kill_workers=True)  # SIGKILL: no waiting for a fit to finish
    # The shutdown closes the call queue, but its feeder thread may still be on its way out: when it
    # ends it drops the queue's last semaphores and unlinks them on its own thread. Ended by os._exit
    # between that unlink and its message to the tracker, the tracker reports a leak (a flaky CI run).
    for thread in threading.enumerate():
        if thread.name == FEEDER_THREAD and thread is not threading.current_thread():
            thread.join(FEEDER_JOIN_S)
    # What that exit hook runs first: the finalizers of priority >= 0, among them every loky
    # semaphore's unlink-and-unregister (exitpriority 0).
    multiprocessing.util._run_finalizers(0)
