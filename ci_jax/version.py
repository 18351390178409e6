"""Which ci-jax this is: the installed package's version and, for a git checkout, its commit.

Light on purpose (no JAX): `ci-jax --version` must answer at once, and `provenance.json` records the
same so that two runs months apart can be told apart by the code that made them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

DIST = "ci-jax"
GIT_TIMEOUT_S = 10.0
# The package's own checkout: run outputs and notes elsewhere in it do not change the code.
_ROOT = Path(__file__).resolve().parent.parent
_CODE = ("ci_jax", "pyproject.toml")


def version() -> str:
    """The version pip installed ("unknown" for a source tree imported without installing it)."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git() -> dict[str, Any] | None:
    """{"commit": full hash, "dirty": whether the package's code differs from it} when the package
    is imported from a git checkout; None otherwise (a wheel install, no git, a checkout git
    refuses to read)."""
    if not (_ROOT / ".git").exists():  # a directory, or a file in a worktree: only our own checkout
        return None
    try:
        commit = _git("rev-parse", "HEAD")
        # Untracked files count: a new module under ci_jax/ changes what runs as much as an edit.
        dirty = bool(_git("status", "--porcelain", "--untracked-files=all", "--", *_CODE))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_S, check=True).stdout.strip()


def record() -> dict[str, Any]:
    """{"version", "commit", "dirty"} for provenance.json; commit and dirty are None outside a checkout."""
    g = git()
    return {"version": version(), "commit": g and g["commit"], "dirty": g and g["dirty"]}


def describe() -> str:
    """'0.2.0 (git 4af89ce0a1b2, dirty)', or just '0.2.0' outside a git checkout."""
    g = git()
    if g is None:
        return version()
    return f"{version()} (git {g['commit'][:12]}{', dirty' if g['dirty'] else ''})"
