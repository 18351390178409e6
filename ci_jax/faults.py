"""Fault injection for the kill-and-resume tests.

With CI_JAX_KILL_AT=NAME in the environment, the process SIGKILLs itself on reaching the point
NAME, exactly as a pre-empted job dies: no cleanup, no flushing. Points: `baseline-epoch` and
`retrain-epoch` (after the first epoch's checkpoint), `gmm` (mixtures fitted, not yet saved),
`write:FILENAME` (the new file written beside its target, not yet renamed over it).
"""

from __future__ import annotations

import os
import signal

ENV = "CI_JAX_KILL_AT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
