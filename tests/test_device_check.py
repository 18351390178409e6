"""experiments/device_check.sh, checked on the CPU: its errors before any work, and its --quick
mode end to end (tiny sizes, the small CNN), one part made to run out of its budget."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ci_jax import data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "device_check.sh"


def _env(**more):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CI_JAX_MNIST_DIR", "PYTHONPATH")}
    return {**env, "PYTHON": sys.executable, **more}


def _lonely_copy(tmp_path: Path) -> Path:
    """The script in a checkout of its own, with no shared/ inside or beside it."""
    root = tmp_path / "nest" / "repo"
    (root / "experiments").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "experiments")
    return root / "experiments" / SCRIPT.name


def test_without_mnist_it_says_where_to_put_it_and_runs_nothing(tmp_path):
    script = _lonely_copy(tmp_path)
    r = subprocess.run([str(script), str(tmp_path / "out")], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_check: MNIST not found")
    assert "shared/data/mnist" in lines[0]
    assert not (tmp_path / "out").exists()


def test_without_an_output_directory_it_says_so(tmp_path):
    r = subprocess.run([str(SCRIPT)], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "device_check: no output directory: give one (experiments/device_check.sh DIR) or set OUT"


def test_an_unknown_option_is_one_line():
    r = subprocess.run([str(SCRIPT), "--fast"], env=_env(), capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip()) == (2, "device_check: unknown option --fast (see --help)")


def test_a_budget_that_is_not_whole_seconds_is_one_line_before_any_work(tmp_path, tiny_mnist):
    env = _env(CI_JAX_MNIST_DIR=str(tiny_mnist), DEVICE_CHECK_BUDGET_CIFAR="1.5")
    r = subprocess.run([str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip()) == \
        (2, "device_check: a DEVICE_CHECK_BUDGET_* of '1.5': expected whole seconds >= 1")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny_mnist(tmp_path):
    ds = data.synthetic(n_train=200, n_test=60, seed=0)
    d = tmp_path / "mnist"
    d.mkdir()
    to_u8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)
    for stem, arr in zip(data.IDX_FILES, (to_u8(ds.x_train), ds.y_train.astype(np.uint8),
                                           to_u8(ds.x_test), ds.y_test.astype(np.uint8))):
        data.write_idx(d / f"{stem}.gz", arr)
    return d


@pytest.mark.slow  # four processes: a preflight, a tiny run and two tiny benches (a minute or two)
def test_quick_mode_writes_json_of_every_part_and_survives_a_timeout(tmp_path, tiny_mnist):
    out = tmp_path / "out"
    # One core: the mixtures fit in-process (no worker pool to start) and the shared CPU is spared.
    taskset = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = _env(OUT=str(out), CI_JAX_MNIST_DIR=str(tiny_mnist), DEVICE_CHECK_BUDGET_BENCH="1")
    r = subprocess.run([*taskset, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "device_check.json").read_text())
    assert summary["quick"] is True and summary["mnist_dir"] == str(tiny_mnist)
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["preflight", "mnist_default_run", "bench_resnets", "bench_cifar_resnet18"]
    # The bench given 1 s is stopped and recorded; the parts after it still run.
    assert (parts["bench_resnets"]["status"], parts["bench_resnets"]["exit_code"]) == ("timeout", 124)
    assert parts["bench_resnets"]["budget_s"] == 1 and parts["bench_resnets"]["output"] == ""
    for name in ("preflight", "mnist_default_run", "bench_cifar_resnet18"):
        assert parts[name]["status"] == "ok", (name, (out / "device_check.log").read_text()[-3000:])
    assert "device_check: bench_resnets timeout" in r.stdout

    report = json.loads((out / parts["mnist_default_run"]["output"]).read_text())
    assert report["data"]["dataset"] == "mnist" and report["data"]["train_images"] == 200
    bench = json.loads((out / "bench_cifar_resnet18.json").read_text())
    assert bench["partial"] is False and bench["preset"] == "paper" and bench["dtypes"] == ["float32", "bfloat16"]
    rows = {(s["stage"], s.get("dtype")) for s in bench["stages"]}
    for dtype in ("float32", "bfloat16"):
        assert {("train", dtype), ("features", dtype), ("filtered", dtype), ("end_to_end", dtype)} <= rows
    # Quick: the mixtures cluster the small CNN's features, not ResNet-18's 512 dimensions.
    assert [s["source"] for s in bench["stages"] if s["stage"] == "gmm"] == ["random-init cnn"]
    e2e = [s for s in bench["stages"] if s["stage"] == "end_to_end"]
    assert {(s["epochs"], s["images"], s["test_images"]) for s in e2e} == {(100, 50_000, 10_000)}
    assert sorted(p.name for p in out.iterdir()) == ["bench_cifar_resnet18.json", "device_check.json",
                                                      "device_check.log", "mnist_default_report.json"]
