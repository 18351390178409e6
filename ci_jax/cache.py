"""Arrays and JSON computed once per key and kept beside the model they came from.

Every read that fails for any reason (missing, truncated, bit-flipped, another key, content that
does not fit) counts as a miss: the value is computed again and rewritten atomically. A damaged
cache therefore costs time, never a wrong result or a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ci_jax import files

Arrays = dict[str, np.ndarray]


def load_npz(path: Path, key: str, fits: Callable[[Arrays], bool] | None = None) -> Arrays | None:
    """The arrays saved under `key`, or None when absent, unreadable, of another key, or when
    `fits(arrays)` (shapes, ranges) says no."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            arrays = {k: z[k] for k in z.files if k != "key"}  # reads (and CRC-checks) every member
    except Exception:  # noqa: BLE001 - zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, ...
        return None
    try:
        return arrays if fits is None or fits(arrays) else None
    except Exception:  # noqa: BLE001 - a check that cannot even index the arrays: they do not fit
        return None


def save_npz(path: Path, **arrays: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    files.atomic_write(path, write)


def _keep(save: Callable[[], None], path: Path) -> None:
    """A cache is a convenience: where it cannot be written (a read-only run shared through
    --baseline-from), the run goes on without it."""
    try:
        save()
    except OSError as e:
        from tqdm.auto import tqdm

        tqdm.write(f"note: not cached, {path} cannot be written ({e.strerror or e})")


def npz(path: Path | None, key: str, compute: Callable[[], Arrays],
        fits: Callable[[Arrays], bool] | None = None) -> Arrays:
    """`compute()`, kept in `path` under `key`; no caching when path is None."""
    if path is not None:
        hit = load_npz(path, key, fits)
        if hit is not None:
            return hit
    arrays = compute()
    if path is not None:
        _keep(lambda: save_npz(path, key=np.asarray(key), **arrays), path)
    return arrays


def json_value(path: Path | None, key: str, compute: Callable[[], Any],
               fits: Callable[[Any], bool] | None = None) -> Any:
    """`compute()` (JSON-serialisable), kept in `path` as {"key": key, "value": ...}."""
    if path is not None:
        try:
            saved = files.read_json(path)
            if saved["key"] == key and (fits is None or fits(saved["value"])):
                return saved["value"]
        except Exception:  # noqa: BLE001 - any damage is a miss
            pass
    value = compute()
    if path is not None:
        _keep(lambda: files.write_json(path, {"key": key, "value": value}), path)
    return value
