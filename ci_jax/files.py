"""Atomic writes: a reader sees the old file or the whole new one, never a partial one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from ci_jax import faults
from ci_jax.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) for a temporary file beside `path`, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name: a directory shared by processes can tell a dead writer's leftovers.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: colleagues read what open() would let them
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        faults.point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def clear_stale_tmp(directory: str | os.PathLike, name: str = "*", shared: bool = False) -> None:
    """Removes temporary files that a killed writer left in `directory` (for files `name`).

    shared: the directory has other writers (a sweep's shared models): only the files of writers
    that are no longer alive go. Otherwise every one does: the caller is the only writer.
    """
    for tmp in Path(directory).glob(f".{name}.*.tmp"):
        if shared and _writer_alive(tmp.name):
            continue
        tmp.unlink(missing_ok=True)


def _writer_alive(tmp_name: str) -> bool:
    m = re.search(r"\.(\d+)-[^.]*\.tmp$", tmp_name)
    if m is None:
        return False  # no pid: written before pids were recorded, long gone
    try:
        os.kill(int(m[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, busy: str | None = None) -> Iterator[None]:
    """Holds an exclusive advisory lock on lock_path (created if missing) for the block.

    busy: don't wait for another holder: raise UserError(busy) at once. POSIX flock: released by
    the kernel when the holder dies, even by kill -9, so a killed run never leaves a lock behind.
    Without fcntl (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")
    except OSError as e:
        raise UserError(f"cannot create the lock file {lock_path} ({os_reason(e)}): "
                        "the directory must be writable") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise UserError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available now (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def read_small_text(path: str | os.PathLike, what: str) -> str:
    """A regular UTF-8 text file read whole; UserError for a missing, special (a device, a pipe)
    or unreadable file, or one that would not fit in the memory available to parse it."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {path} is not a regular file: give the path of a text file")
        free = available_memory()
        # Parsing takes several times the text's size; a file near the free memory cannot be parsed.
        if free is not None and st.st_size * 8 > free:
            raise UserError(f"{what} {path} is {st.st_size} bytes: too large to parse in the "
                            f"{free // 2**20} MiB of memory available; is it the right file?")
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (bad byte at offset {e.start}): "
                        "is it the right file?") from None


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a directory this process can write (created if missing); UserError naming `flag`
    when it is empty, a file, under a file, or not writable."""
    if str(path) == "":
        raise UserError(f"{flag} is empty: give a directory")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except FileExistsError:
        raise UserError(f"{flag} {path}: a file is in the way (it or a parent is not a directory): "
                        "choose a directory") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({os_reason(e)}): choose another directory") from None
    return path


def os_reason(e: OSError) -> str:
    """An OSError in words, e.g. 'No space left on device'."""
    if e.errno == errno.ENOTDIR:
        return "a parent is a file, not a directory"
    return e.strerror or type(e).__name__
