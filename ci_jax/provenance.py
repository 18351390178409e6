"""What a run ran with: the ci-jax version and commit, library versions, devices and a hash of its
data (provenance.json).

Enough to tell, months later, whether two runs can be compared: same code, same data bytes, same
library versions, same kind of device.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from typing import Any

import jax
import numpy as np

from ci_jax import data, version

# Distribution names (as pip knows them), not module names.
PACKAGES: tuple[str, ...] = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "scikit-learn",
                             "numpy", "tensorflow-datasets")
CHUNK_BYTES = 1 << 20


def record(dataset: data.Dataset) -> dict[str, Any]:
    """Versions, devices and data hash for `dataset`; JSON-serializable."""
    return {
        "ci_jax": version.record(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "device": device(),
        "data": _data(dataset),
    }


def device() -> dict[str, Any]:
    """The backend, the kind of its first device, and how many devices the run spans."""
    return {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
            "count": jax.device_count()}


def _version(dist: str) -> str | None:
    # Package metadata, not an import: importing tensorflow_datasets could pull in TensorFlow
    # (seconds, and a GPU grab); None for what is not installed, like the optional tfds.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _data(dataset: data.Dataset) -> dict[str, Any]:
    if dataset.files:
        return {"name": dataset.name,
                "files": [{"path": p, "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
                          for p in dataset.files]}
    # tfds or synthetic: no files of ours to point at, so hash what was loaded.
    return {"name": dataset.name, "arrays_sha256": sha256_arrays(
        dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):  # in chunks: a dataset may not fit in memory twice
            h.update(chunk)
    return h.hexdigest()


def sha256_arrays(*arrays: np.ndarray) -> str:
    """One hash over the arrays' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        # dtype and shape too: the same bytes as float32 (N, 784) or uint8 (4N, 784) differ.
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
