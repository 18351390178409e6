import atexit
import os
import shutil
import tempfile

# The suite is an entry point like the CLI: it sets XLA's flags before JAX starts a backend. It runs
# on one CPU device; forced multi-device CPU runs are opt-in (CI_JAX_CPU_DEVICES, see ci_jax/cli.py).
from ci_jax import kernels

os.environ["XLA_FLAGS"] = kernels.xla_flags()

# A persistent compilation cache of the suite's own, fresh for each pytest process (each xdist worker)
# and handed to every process it starts: the suite builds hundreds of Trainers and CLI processes
# over the same few programs, and XLA:CPU compiling each anew was a large share of its time. Every
# program is kept, however quick its compile. Nothing outside the session's cache is read, so no
# test sees a program that another session compiled.
_XLA_CACHE = tempfile.mkdtemp(prefix="ci-jax-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
# The variables reach the processes a test starts; this process imported JAX already (kernels), so
# its own settings are made directly.
os.environ["CI_JAX_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from ci_jax import cli, data, train  # noqa: E402

from helpers import finished_run_args, train_cfg, trainer  # noqa: E402

# The same examples on every run, no deadline: a fuzz test fails on its input, never on the
# machine's load or on what an earlier run happened to find.
settings.register_profile("ci-jax", derandomize=True, deadline=None, database=None)
settings.load_profile("ci-jax")


@pytest.fixture(scope="session")
def synthetic_data():
    """data.synthetic(n_train, n_test, seed=0, ...), each task made once per session. Its arrays are
    read-only: a test that changes images works on a copy."""
    made = {}

    def make(n_train: int, n_test: int, seed: int = 0, **kw) -> data.Dataset:
        key = (n_train, n_test, seed, tuple(sorted(kw.items())))
        if key not in made:
            ds = data.synthetic(n_train=n_train, n_test=n_test, seed=seed, **kw)
            for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
                a.setflags(write=False)
            made[key] = ds
        return made[key]

    return make


@pytest.fixture(scope="session")
def ds(synthetic_data):
    """The task of the end-to-end runs: 1,500 training images (150 a class), 500 test images."""
    return synthetic_data(1500, 500)


@pytest.fixture(scope="session")
def small_ds(synthetic_data):
    """The task of single trainings (train, checkpoint): 512 training images, 256 test images."""
    return synthetic_data(512, 256)


@pytest.fixture(scope="session")
def trained_dir(small_ds, tmp_path_factory):
    """A finished checkpoint directory of helpers.train_cfg() on small_ds (one epoch), key "k"; copy it
    before changing it."""
    path = tmp_path_factory.mktemp("trained") / "ckpt"
    train.train(trainer(train_cfg(), small_ds), small_ds.x_train, small_ds.y_train, path, key="k")
    return path


@pytest.fixture(scope="session")
def mnist_like_dir(synthetic_data, tmp_path_factory):
    """A small synthetic task (400 training and 100 test images) written as the four MNIST IDX files,
    for runs through the CLI."""
    ds = synthetic_data(400, 100)
    d = tmp_path_factory.mktemp("mnist")
    to_u8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)
    for stem, arr in zip(data.IDX_FILES, (to_u8(ds.x_train), ds.y_train.astype(np.uint8),
                                           to_u8(ds.x_test), ds.y_test.astype(np.uint8))):
        data.write_idx(d / f"{stem}.gz", arr)
    return d


@pytest.fixture(scope="session")
def finished_run(mnist_like_dir, tmp_path_factory):
    """A finished `ci-jax run` over mnist_like_dir (helpers.finished_run_args), in this process; copy it
    before changing it."""
    out = tmp_path_factory.mktemp("finished") / "r"
    assert cli.main(finished_run_args(mnist_like_dir, out)) == 0
    return out


def pytest_addoption(parser):
    parser.addoption("--repeat", type=int, default=1, metavar="N",
                     help="run each selected test N times (experiments/flake_check.py uses it on the "
                          "tests marked timing)")


def pytest_generate_tests(metafunc):
    n = metafunc.config.getoption("repeat")
    if n > 1:
        metafunc.fixturenames.append("_repetition")
        metafunc.parametrize("_repetition", range(n), ids=lambda i: f"rep{i}")


# End to end: tests that train models or run the CLI as a process are marked slow, and `pytest -m
# "not slow"` leaves them out for a quick loop (the README's test command runs everything). A module
# whose tests are all end to end says so itself (`pytestmark = pytest.mark.slow`, which moves with
# the file); so does a single test elsewhere; and a test that uses one of these fixtures, or is
# marked timing, is slow wherever it lives.
SLOW_FIXTURES = {"finished", "first_run", "trained_dir", "full_sweep", "finished_run", "uninterrupted",
                 "mnist_like_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("timing"):
            item.add_marker(pytest.mark.slow)
