"""ci_jax.files: atomic writes that follow the umask, and the leftovers of writers that died."""

import os
import subprocess
import sys

import pytest

from ci_jax import files


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        files.write_json(tmp_path / "r.json", {"a": 1})
        files.write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    for name in ("r.json", "t.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    files.write_text(tmp_path / "t.txt", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "t.txt", fail)
    assert (tmp_path / "t.txt").read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]


def test_shared_directories_lose_only_dead_writers_leftovers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = tmp_path / f".x.npz.{os.getpid()}-abc.tmp"
    gone = tmp_path / f".x.npz.{int(dead.stdout)}-abc.tmp"
    for p in (mine, gone):
        p.write_text("partial")
    files.clear_stale_tmp(tmp_path, shared=True)
    assert mine.exists() and not gone.exists()
    files.clear_stale_tmp(tmp_path)
    assert not mine.exists()
