"""provenance.record: versions, devices and a data hash that changes exactly when the data does."""

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest

from ci_jax import data, provenance


@pytest.fixture(scope="module")
def synthetic(synthetic_data):
    return synthetic_data(40, 20)


def test_record_has_versions_and_devices_and_is_json(synthetic):
    rec = provenance.record(synthetic)
    assert json.loads(json.dumps(rec)) == rec
    assert rec["python"] == platform.python_version()
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "scikit-learn", "numpy",
                 "tensorflow-datasets"):
        assert name in rec["packages"]
    assert rec["packages"]["jax"] == jax.__version__
    assert rec["packages"]["numpy"] == np.__version__
    assert rec["packages"]["orbax-checkpoint"] == importlib.metadata.version("orbax-checkpoint")
    assert rec["device"] == {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                             "count": jax.device_count()}


def test_missing_package_is_none(synthetic, monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("numpy", "surely-not-installed-pkg"))
    assert provenance.record(synthetic)["packages"] == {"numpy": np.__version__,
                                                        "surely-not-installed-pkg": None}


def test_synthetic_data_is_hashed_by_its_arrays(synthetic, synthetic_data):
    rec = provenance.record(synthetic)["data"]
    assert rec["name"] == "synthetic" and "files" not in rec
    assert rec == provenance.record(data.synthetic(n_train=40, n_test=20, seed=0))["data"]  # made anew
    assert rec != provenance.record(synthetic_data(40, 20, seed=1))["data"]


def test_array_hash_sees_one_changed_value_dtype_and_shape():
    x = np.zeros((4, 3), np.float32)
    base = provenance.sha256_arrays(x)
    y = x.copy()
    y[2, 1] = 1e-7
    assert provenance.sha256_arrays(y) != base
    assert provenance.sha256_arrays(x.reshape(3, 4)) != base
    assert provenance.sha256_arrays(x.view(np.int32)) != base
    assert provenance.sha256_arrays(np.asfortranarray(x)) == base  # layout is not data
    assert provenance.sha256_arrays(x[:2], x[2:]) != base


def test_file_datasets_are_hashed_file_by_file(tmp_path):
    rng = np.random.default_rng(0)
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(20) % 10).astype(np.uint8))
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", (np.arange(10) % 10).astype(np.uint8))
    rec = provenance.record(data.load("mnist", tmp_path))["data"]
    assert rec["name"] == "mnist" and "arrays_sha256" not in rec
    assert [f["path"] for f in rec["files"]] == [str(tmp_path.resolve() / n) for n in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte")]
    for f in rec["files"]:
        with open(f["path"], "rb") as fh:
            raw = fh.read()
        assert f["sha256"] == hashlib.sha256(raw).hexdigest() and f["bytes"] == len(raw)


def test_file_hash_in_chunks_equals_the_whole_file_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "CHUNK_BYTES", 7)
    raw = np.random.default_rng(0).bytes(1000)
    (tmp_path / "f").write_bytes(raw)
    assert provenance.sha256_file(tmp_path / "f") == hashlib.sha256(raw).hexdigest()


def test_record_does_not_import_tensorflow():
    code = ("import sys; from ci_jax import data, provenance; "
            "provenance.record(data.synthetic(n_train=20, n_test=10)); "
            "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split() == ["False", "False"]


def test_record_has_the_ci_jax_version_and_commit(synthetic):
    from ci_jax import version

    rec = provenance.record(synthetic)["ci_jax"]
    assert rec["version"] == importlib.metadata.version("ci-jax")
    git = version.git()
    if git is None:
        assert rec["commit"] is None and rec["dirty"] is None
    else:
        head = subprocess.run(["git", "-C", str(version._ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert rec["commit"] == head and isinstance(rec["dirty"], bool)


def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path, monkeypatch):
    from ci_jax import version

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       capture_output=True, check=True)

    def fresh():
        version.git.cache_clear()
        return version.git()

    monkeypatch.setattr(version, "_ROOT", tmp_path)
    try:
        assert fresh() is None  # not a checkout: a wheel installed in site-packages
        (tmp_path / "ci_jax").mkdir()
        (tmp_path / "ci_jax" / "a.py").write_text("x = 1\n")
        git("init", "-q")
        git("add", ".")
        git("commit", "-q", "-m", "c")
        head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert fresh() == {"commit": head, "dirty": False}
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "report.json").write_text("{}")  # outputs are not code
        assert fresh()["dirty"] is False
        (tmp_path / "ci_jax" / "b.py").write_text("y = 2\n")  # a new module is
        assert fresh()["dirty"] is True
        (tmp_path / "ci_jax" / "b.py").unlink()
        (tmp_path / "ci_jax" / "a.py").write_text("x = 2\n")
        assert fresh()["dirty"] is True
        assert version.describe() == f"{version.version()} (git {head[:12]}, dirty)"
    finally:
        version.git.cache_clear()
