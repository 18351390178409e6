"""Checkpoints of the named train state ({"model": ..., "optimizer": ...}), one Orbax step per epoch.

A model's directory:
- `key.json`: what is trained here (written before anything else);
- `orbax/<epoch>/`: Orbax's step directories;
- `sums/<epoch>.json`: size and sha256 of every file of that step, written once Orbax has
  finalised it. A step counts only once its sums exist, and its files are checked against them
  before Orbax reads a byte: a damaged step is refused up front, so no read is left running when
  the error is raised (a restore that failed half-way left Orbax's and TensorStore's read tasks
  to print tracebacks at exit);
- `done.json`: the model is finished.

A directory of another key is never deleted: it is moved to `models/<name>-<hash of its key>`
beside the directory, and moved back when that key is trained again, so switching a setting back
and forth in one run directory reuses every model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ci_jax import files
from ci_jax.errors import UserError, one_line

SHELF = "models"
Manager = ocp.CheckpointManager


class Stateful(Protocol):
    """What a checkpoint saves and restores: `train.Trainer`."""

    cfg: Any

    def named_state(self) -> dict[str, Any]: ...

    def load_named_state(self, named: dict[str, Any]) -> None: ...


# -- markers ------------------------------------------------------------------------------------
def damaged(ckpt_dir: Path, what: str) -> UserError:
    return UserError(f"checkpoint directory {ckpt_dir} is damaged ({what}): delete that directory "
                     f"to train this model again from scratch")


def _read_marker(ckpt_dir: Path, name: str) -> dict[str, Any] | None:
    """key.json / done.json as a dict with a "key"; None if absent; UserError if unreadable."""
    path = ckpt_dir / name
    if not path.exists():
        return None
    try:
        d = files.read_json(path)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise damaged(ckpt_dir, f"{name} is unreadable: {type(e).__name__}") from None
    if not isinstance(d, dict) or not isinstance(d.get("key"), str):
        raise damaged(ckpt_dir, f"{name} does not hold a key")
    return d


def finished(ckpt_dir: str | os.PathLike, key: str) -> bool:
    """Whether `ckpt_dir` holds the finished model of `key` (by its markers; `load` verifies it)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        return files.read_json(ckpt_dir / "done.json").get("key") == key and \
            files.read_json(ckpt_dir / "key.json").get("key") == key
    except Exception:  # noqa: BLE001 - a damaged marker is looked at, and named, under the lock
        return False


def mark_done(ckpt_dir: Path, key: str, epochs: int) -> None:
    files.write_json(ckpt_dir / "done.json", {"key": key, "epochs": epochs})


# -- step files and their sums ------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_files(step_dir: Path) -> dict[str, list]:
    return {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _sha256(p)]
            for p in sorted(step_dir.rglob("*")) if p.is_file()}


def _sums_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / "sums" / f"{step}.json"


def _write_sums(ckpt_dir: Path, step: int) -> None:
    files.write_json(_sums_path(ckpt_dir, step), {"step": step, "files": _step_files(ckpt_dir / "orbax" / str(step))})


def _summed_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in (ckpt_dir / "sums").glob("*.json") if p.stem.isdigit())


def verify(ckpt_dir: Path, step: int) -> None:
    """UserError (damaged) unless every file of the step is as it was saved."""
    try:
        sums = files.read_json(_sums_path(ckpt_dir, step))
        listed = sums["files"]
        if not isinstance(listed, dict) or not listed:
            raise ValueError("no files listed")
        entries = [(str(rel), int(size), str(digest)) for rel, (size, digest) in listed.items()]
    except Exception as e:  # noqa: BLE001 - unreadable, not JSON, not of this shape
        raise damaged(ckpt_dir, f"sums/{step}.json is unreadable: {type(e).__name__}") from None
    step_dir = ckpt_dir / "orbax" / str(step)
    if not step_dir.is_dir():
        raise damaged(ckpt_dir, f"the directory of epoch {step}, orbax/{step}, is missing")
    for rel, size, digest in entries:
        path = step_dir / rel
        try:
            if not path.is_file():
                raise damaged(ckpt_dir, f"orbax/{step}/{rel} is missing")
            if path.stat().st_size != size:
                raise damaged(ckpt_dir, f"orbax/{step}/{rel} has {path.stat().st_size} bytes, {size} were saved")
            if _sha256(path) != digest:
                raise damaged(ckpt_dir, f"orbax/{step}/{rel} differs from what was saved")
        except OSError as e:
            raise damaged(ckpt_dir, f"orbax/{step}/{rel} is unreadable: {files.os_reason(e)}") from None


# -- Orbax --------------------------------------------------------------------------------------
def manager(ckpt_dir: Path) -> ocp.CheckpointManager:
    """Orbax's manager of `ckpt_dir/orbax`. Steps are pruned by `save` once a newer one is summed
    (Orbax's own max_to_keep would delete the older step before the newer one counts)."""
    return ocp.CheckpointManager((ckpt_dir / "orbax").resolve(), item_handlers=ocp.StandardCheckpointHandler(),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))


def save(mngr: ocp.CheckpointManager, ckpt_dir: Path, step: int, model: Stateful) -> None:
    """Saves the named state as `step`, sums its files, then drops the older steps."""
    try:
        mngr.save(step, args=ocp.args.StandardSave(model.named_state()))
        mngr.wait_until_finished()
        _write_sums(ckpt_dir, step)
    except Exception as e:  # noqa: BLE001 - Orbax wraps a full disk in several exception types
        text = str(e)
        if isinstance(e, OSError) or "RESOURCE_EXHAUSTED" in text or "No space left" in text:
            raise UserError(f"cannot save the checkpoint of epoch {step} in {ckpt_dir} "
                            f"({one_line(text, 120)}): free some space and rerun the same command "
                            "to resume") from None
        raise
    for old in mngr.all_steps():
        if old < step:
            mngr.delete(old)
    for old in _summed_steps(ckpt_dir):
        if old < step:
            _sums_path(ckpt_dir, old).unlink(missing_ok=True)


def _checked_latest(ckpt_dir: Path) -> int | None:
    """The newest summed step, its files checked against its sums, before Orbax opens anything
    (its manager reads each step's metadata as it starts). None: no step counts yet, or the
    directory was written before sums (ci-jax 0.2), whose steps Orbax lists itself."""
    summed = _summed_steps(ckpt_dir)
    if summed:
        verify(ckpt_dir, summed[-1])
        return summed[-1]
    return None


def _legacy(ckpt_dir: Path) -> bool:
    return not (ckpt_dir / "sums").exists()


def _reason(e: BaseException) -> str:
    # TensorStore appends "See full TensorStore details: <bound method ...>", which says nothing.
    return one_line(str(e).split(". See full TensorStore details")[0])


def _flat_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    if isinstance(tree, dict):
        out: dict[str, tuple[int, ...]] = {}
        for k, v in tree.items():
            out.update(_flat_shapes(v, f"{prefix}{k}/"))
        return out
    shape = getattr(tree, "shape", None)
    return {prefix[:-1]: tuple(shape) if shape is not None else ()}


def mismatch(expected: dict[str, Any], saved: Any) -> str | None:
    """What differs between the state a model expects and a checkpoint's tree: missing, extra
    and mis-shaped parameters, by name; None when they fit."""
    want, have = _flat_shapes(expected), _flat_shapes(saved)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shaped = sorted(f"{k} {have[k]} (model: {want[k]})" for k in set(want) & set(have) if want[k] != have[k])
    if not (missing or extra or shaped):
        return None
    parts = []
    for what, names in (("missing", missing), ("extra", extra), ("mis-shaped", shaped)):
        if names:
            parts.append(f"{what}: {', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else ""))
    return "; ".join(parts)


def _as_dict(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {str(k): _as_dict(v) for k, v in tree.items()}
    return tree


def restore(mngr: ocp.CheckpointManager, model: Stateful, ckpt_dir: Path, latest: int | None,
            model_only: bool = False) -> int:
    """Loads step `latest` (from `_checked_latest`) into `model`; returns it (0: none).

    A step whose parameters do not match the model (its code changed) names what differs.
    model_only: a finished model, reused for inference: only its parameters must match (an
    optimizer state of another layout, from another version of ci-jax, is left alone).
    """
    expected = model.named_state()
    fresh_optimizer = expected["optimizer"]
    if model_only:
        expected = {"model": expected["model"]}
    try:
        if latest is None and _legacy(ckpt_dir):
            latest = mngr.latest_step()  # Orbax lists only finalised steps
        if latest is None:
            return 0
        saved = mngr.item_metadata(latest)
    except Exception as e:  # noqa: BLE001 - tensorstore, JSON, OSError, ...: the ways to fail are open
        step = f"epoch {latest}" if latest is not None else "its step list"
        raise damaged(ckpt_dir, f"cannot read {step}: {type(e).__name__}: {_reason(e)}") from None
    if saved is not None and hasattr(saved, "tree"):
        saved = saved.tree
    if saved is None and model_only:  # no tree metadata to take the model from: restore the whole state
        model_only, expected = False, model.named_state()
    saved = _as_dict(saved) if saved is not None else None
    if model_only and saved is not None and mismatch({"o": fresh_optimizer}, {"o": saved.get("optimizer", {})}) is None:
        model_only, expected = False, model.named_state()  # the same layout: the whole state, as saved
    if model_only and saved is not None:
        saved = {"model": saved.get("model", {})}
    differs = mismatch(expected, saved) if saved is not None else None
    if differs:
        raise UserError(f"checkpoint directory {ckpt_dir} holds a model that does not match "
                        f"{model.cfg.train.model}'s parameters ({differs}): it was saved by other "
                        "model code; delete that directory to train this model again")
    try:
        if model_only:  # the saved tree as it is, of which the model is taken
            restored = {"model": _as_dict(mngr.restore(latest, args=ocp.args.StandardRestore()))["model"]}
        else:
            restored = mngr.restore(latest, args=ocp.args.StandardRestore(
                jax.tree.map(ocp.utils.to_shape_dtype_struct, expected)))
    except Exception as e:  # noqa: BLE001 - bytes that were damaged before their sums were taken
        raise damaged(ckpt_dir, f"cannot restore epoch {latest}: {type(e).__name__}: {_reason(e)}") from None
    # Training stops before saving a non-finite loss, so non-finite weights mean damaged bytes.
    if not all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(restored)
               if jnp.issubdtype(np.asarray(a).dtype, jnp.inexact)):
        raise damaged(ckpt_dir, f"epoch {latest} holds non-finite weights")
    model.load_named_state({"optimizer": fresh_optimizer, **restored})
    if _legacy(ckpt_dir):
        _adopt(ckpt_dir, latest)
    return latest


def _adopt(ckpt_dir: Path, step: int) -> None:
    """Sums for a step saved before sums existed, now that it has restored whole and finite."""
    try:
        _write_sums(ckpt_dir, step)
    except OSError:
        pass  # a read-only model: it is checked as before, by restoring it


# -- the model's directory ----------------------------------------------------------------------
def load(model: Stateful, ckpt_dir: str | os.PathLike) -> int:
    """Loads the finished model in `ckpt_dir` (see `finished`) for inference; only reads."""
    ckpt_dir = Path(ckpt_dir)
    latest = _checked_latest(ckpt_dir)
    mngr = manager(ckpt_dir)
    try:
        epoch = restore(mngr, model, ckpt_dir, latest, model_only=True)
    finally:
        mngr.close()
    if epoch != model.cfg.train.epochs:
        raise damaged(ckpt_dir, f"done.json says finished but the last epoch saved is {epoch}")
    return epoch


def check(ckpt_dir: str | os.PathLike, key: str) -> None:
    """UserError (damaged) if `ckpt_dir` holds `key`'s model and its markers or its latest step
    are damaged; reads no array. A run calls it before it writes anything."""
    ckpt_dir = Path(ckpt_dir)
    meta = _read_marker(ckpt_dir, "key.json")
    if meta is None or meta["key"] != key:
        return  # nothing here yet, or another key's model, which is moved aside unread
    done = _read_marker(ckpt_dir, "done.json")
    if done is not None and done["key"] != key:
        raise damaged(ckpt_dir, "done.json and key.json disagree")
    _checked_latest(ckpt_dir)


def shelved(ckpt_dir: Path, key: str) -> Path:
    """Where the model of `key` is kept while `ckpt_dir` holds another."""
    return ckpt_dir.parent / SHELF / f"{ckpt_dir.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _make_room(ckpt_dir: Path, key: str) -> None:
    """Moves a model of another key out of `ckpt_dir` (to its shelf), and the model of `key` back
    in from its shelf if it was trained here before. Nothing is deleted."""
    meta = _read_marker(ckpt_dir, "key.json")
    if meta is not None and meta["key"] != key:
        aside = shelved(ckpt_dir, meta["key"])
        if aside.exists():  # a copy of that key is kept already: this one was trained again beside it
            aside = aside.with_name(f"{aside.name}-{os.getpid()}")
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ckpt_dir, aside)
    if not ckpt_dir.exists() and shelved(ckpt_dir, key).is_dir():
        os.replace(shelved(ckpt_dir, key), ckpt_dir)


def open_for_training(model: Stateful, ckpt_dir: Path, key: str) -> tuple[ocp.CheckpointManager, int]:
    """Under the directory's lock: shelves a directory of another key, refuses a damaged one,
    marks it with `key`, restores the latest epoch into `model`. Returns (manager, epoch)."""
    _make_room(ckpt_dir, key)
    meta = _read_marker(ckpt_dir, "key.json")
    if meta is None and ((ckpt_dir / "orbax").exists() or (ckpt_dir / "done.json").exists()):
        # key.json is written before anything else: without it, whose weights these are is unknown.
        raise damaged(ckpt_dir, "key.json is missing")
    done = _read_marker(ckpt_dir, "done.json")
    if done is not None and done["key"] != key:
        raise damaged(ckpt_dir, "done.json and key.json disagree")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if meta is None:
        files.write_json(ckpt_dir / "key.json", {"key": key})
        (ckpt_dir / "sums").mkdir(exist_ok=True)  # this directory's steps count once summed
    latest = _checked_latest(ckpt_dir)
    mngr = manager(ckpt_dir)
    try:
        start = restore(mngr, model, ckpt_dir, latest)
        for step in mngr.all_steps():  # saved after `start` but never summed: a save cut short
            if step > start:
                mngr.delete(step)
        return mngr, start
    except BaseException:
        mngr.close()
        raise
