"""Arrays and JSON computed once per key and kept beside the model they came from.

Every read that fails for any reason (missing, truncated, bit-flipped, another key, content that
does not fit) counts as a miss: the value is computed again and rewritten atomically. A damaged
cache therefore costs time, never a wrong result or a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

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


def _places(where: Path | Sequence[Path] | None) -> list[Path]:
    """Where a value is looked for: the first place is where it is kept; the others are only read
    (a baseline borrowed with --baseline-from, whose directory is another run's)."""
    if where is None:
        return []
    return [Path(where)] if isinstance(where, (str, Path)) else [Path(p) for p in where]


def npz(where: Path | Sequence[Path] | None, key: str, compute: Callable[[], Arrays],
        fits: Callable[[Arrays], bool] | None = None) -> Arrays:
    """`compute()`, kept in the first place of `where` under `key` (see `_places`); no caching
    when there is none."""
    places = _places(where)
    for path in places:
        hit = load_npz(path, key, fits)
        if hit is not None:
            return hit
    arrays = compute()
    if places:
        _keep(lambda: save_npz(places[0], key=np.asarray(key), **arrays), places[0])
    return arrays


def json_value(where: Path | Sequence[Path] | None, key: str, compute: Callable[[], Any],
               fits: Callable[[Any], bool] | None = None) -> Any:
    """`compute()` (JSON-serialisable), kept in the first place of `where` as {"key": key,
    "value": ...}."""
    places = _places(where)
    for path in places:
        try:
            saved = files.read_json(path)
            if saved["key"] == key and (fits is None or fits(saved["value"])):
                return saved["value"]
        except Exception:  # noqa: BLE001 - any damage is a miss
            pass
    value = compute()
    if places:
        _keep(lambda: files.write_json(places[0], {"key": key, "value": value}), places[0])
    return value
