import os

# The suite is an entry point like the CLI: it sets XLA's flags before JAX starts a backend. It runs
# on one CPU device; forced multi-device CPU runs are opt-in (CI_JAX_CPU_DEVICES, see ci_jax/cli.py).
from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from ci_jax import data  # noqa: E402

# The same examples on every run, no deadline: a fuzz test fails on its input, never on the
# machine's load or on what an earlier run happened to find.
settings.register_profile("ci-jax", derandomize=True, deadline=None, database=None)
settings.load_profile("ci-jax")


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


def pytest_addoption(parser):
    parser.addoption("--repeat", type=int, default=1, metavar="N",
                     help="run each selected test N times (experiments/flake_check.py uses it on the "
                          "tests marked timing)")


def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("repeat")
    if n > 1:
        metafunc.fixturenames.append("_repetition")
        metafunc.parametrize("_repetition", range(n), ids=lambda i: f"rep{i}")


# End to end: these train models or run the CLI as a process. `pytest -m "not slow"` leaves them out
# for a quick loop; the README's test command runs everything.
SLOW_MODULES = {"test_experiment.py", "test_hardening.py", "test_sweep.py", "test_stack.py", "test_checkpoint.py",
                "test_registry.py"}
SLOW_FIXTURES = {"finished", "first_run", "trained_dir", "full_sweep", "finished_run", "uninterrupted",
                 "mnist_like_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.path.name in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.get_closest_marker("timing")):
            item.add_marker(pytest.mark.slow)

