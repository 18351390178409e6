import os

# The suite is an entry point like the CLI: it sets XLA's flags before JAX starts a backend. It runs
# on one CPU device; forced multi-device CPU runs are opt-in (CI_JAX_CPU_DEVICES, see ci_jax/cli.py).
from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ci_jax import data  # noqa: E402


@pytest.fixture(scope="session")
def mnist_like_dir(tmp_path_factory):
    """A small synthetic task written as the four MNIST IDX files, for runs through the CLI."""
    ds = data.synthetic(n_train=400, n_test=100, seed=0)
    d = tmp_path_factory.mktemp("mnist")
    to_u8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)
    for stem, arr in zip(data.IDX_FILES, (to_u8(ds.x_train), ds.y_train.astype(np.uint8),
                                           to_u8(ds.x_test), ds.y_test.astype(np.uint8))):
        data.write_idx(d / f"{stem}.gz", arr)
    return d
