# The suite runs on one CPU device. Forced multi-device CPU runs are opt-in
# (CI_JAX_CPU_DEVICES, see ci_jax/cli.py) after XLA:CPU's in-process all-reduce aborted twice.
import numpy as np
import pytest

from ci_jax import data


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
