"""ci_jax.files: atomic writes that follow the umask."""

import os

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
