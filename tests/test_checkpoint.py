"""A damaged checkpoint through the CLI, as a real process: one error line and exit 2, whatever was
damaged and whatever the timing. A restore that failed half-way used to leave Orbax's and
TensorStore's reads running, which printed tracebacks at exit around the error line (issue 27);
each step's files are now checked against their sums before any read starts."""

import os
import shutil
import subprocess
import sys

import pytest


def _cmd(data_dir, out):
    return [sys.executable, "-m", "ci_jax.cli", "run", "--preset", "fast", "--data-dir", str(data_dir),
            "--out", str(out), "--train.epochs", "1", "--attack.n_poison", "10", "--no-plots"]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def finished_run(mnist_like_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "r"
    proc = subprocess.run(_cmd(mnist_like_dir, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _step(run):
    return run / "baseline" / "orbax" / "1"


def _largest(run):
    return max((p for p in _step(run).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


DAMAGE = {  # each kind of file Orbax writes for a step, and the step directory itself
    "array_data_truncated": lambda r: _truncate(_largest(r)),
    "array_data_one_bit": lambda r: _flip(_largest(r)),
    "tree_metadata": lambda r: next(_step(r).rglob("_METADATA")).write_text("{garbage"),
    "array_metadatas": lambda r: _truncate(next(p for p in _step(r).rglob("*") if p.parent.name == "array_metadatas")),
    "ocdbt_manifest": lambda r: _truncate(next(_step(r).glob("*/manifest.ocdbt"))),
    "checkpoint_metadata": lambda r: (_step(r) / "_CHECKPOINT_METADATA").write_text("{"),
    "step_directory_deleted": lambda r: shutil.rmtree(_step(r)),
    "step_directory_emptied": lambda r: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(_step(r).iterdir())],
}


@pytest.mark.timing
@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_through_the_cli_is_one_line_and_exit_2(finished_run, mnist_like_dir, tmp_path, damage):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    damage(run)
    proc = subprocess.run(_cmd(mnist_like_dir, run), env=_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "it/s" not in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 2 and ": backend cpu, 1 device" in lines[0], proc.stderr[-2000:]  # the start-up line
    lines = lines[1:]
    assert lines[0].startswith(f"ci-jax: error: checkpoint directory {run / 'baseline'} is damaged ("), lines[0]
    assert lines[0].endswith("delete that directory to train this model again from scratch"), lines[0]
    assert (run / "report.json").read_text() == (finished_run / "report.json").read_text()  # nothing lost
