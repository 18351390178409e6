"""Datasets (ci_jax.data): IDX files and MNIST-like directories, CIFAR-10/100 and GTSRB in their own
layouts, tensorflow-datasets, the synthetic task, and end to end on the RGB layouts."""

import gzip
import os
import pickle
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ci_jax import config, data, experiment
from ci_jax.errors import UserError

REAL_MNIST = Path(__file__).parents[1].parent / "shared/data/mnist"
N_TRAIN, N_TEST = 50, 20


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    # A developer's own $CI_JAX_DATA_DIR must not leak into these tests.
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def _write_idx_set(root: Path, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data.write_idx(root / (stem + (".gz" if gz else "")), array)
    return arrays


@pytest.fixture
def idx_dir(tmp_path):
    return tmp_path, _write_idx_set(tmp_path)


# ---------------------------------------------------------------- IDX reading and writing


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 3, 4, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"a-idx{suffix}"
    data.write_idx(path, array)
    back = data.read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(UserError, match="uint8"):
        data.write_idx(tmp_path / "x", np.zeros((2, 2), np.float32))


def test_read_idx_checks_rank(tmp_path):
    data.write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(UserError, match="labels: has 1 dimensions, expected 3"):
        data.read_idx(tmp_path / "labels", ndim=3)


def test_read_idx_reports_extra_bytes(tmp_path):
    path = tmp_path / "x"
    data.write_idx(path, np.zeros((2, 3), np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(UserError, match="too long: header says 2x3 = 6 bytes of data, file has 7"):
        data.read_idx(path)


@pytest.fixture
def no_hang():
    """Fails a test that blocks (e.g. opening a fifo) instead of hanging the suite."""
    def hung(signum, frame):
        raise TimeoutError("blocked for 10 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _make_not_a_file(path: Path, kind: str) -> str:
    """Puts a `kind` at `path`; returns what the error must say about it."""
    if kind == "directory":
        path.mkdir()
        return "is a directory, not a regular file"
    if kind == "fifo":
        os.mkfifo(path)
        return r"is a named pipe \(fifo\), not a regular file"
    if kind == "symlink loop":
        path.symlink_to(path.name)
        return "is a symlink loop, not a data file; fix the link"
    path.symlink_to("gone")
    return r"is a dangling symlink \(to gone, which does not exist\), not a data file; fix the link"


NOT_A_FILE = ["directory", "fifo", "symlink loop", "dangling link"]


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_read_idx_of_something_not_a_file_says_what_it_is(tmp_path, no_hang, kind):
    message = _make_not_a_file(tmp_path / "x-idx.gz", kind)
    with pytest.raises(UserError, match="x-idx.gz: " + message):
        data.read_idx(tmp_path / "x-idx.gz")


def test_read_idx_of_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="nothing-idx: no such file"):
        data.read_idx(tmp_path / "nothing-idx")


def test_read_idx_counts_a_long_excess_only_so_far(tmp_path):
    path = tmp_path / "bomb-idx.gz"
    # 1 byte announced, 80 MB of zeros behind it: about 80 kB compressed.
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]) + bytes(80 << 20), 1))
    with pytest.raises(UserError, match=r"too long: .* file has over \d+"):
        data.read_idx(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(2**31,), (2**32 - 1,) * 4, (65536, 65536, 2)])
def test_huge_header_fails_the_length_check_without_allocating(tmp_path, suffix, shape):
    import tracemalloc

    raw = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape) + bytes(10)
    path = tmp_path / f"huge-idx{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    tracemalloc.start()
    try:
        # Refused before reading: the file cannot hold what the header declares (deflate
        # compresses at most about 1032:1).
        with pytest.raises(UserError, match=r"header says .* bytes of data, more than a \d+-byte file can hold"):
            data.read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_header_declaring_more_than_memory_holds_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "images-idx"
    data.write_idx(path, np.zeros((3, 28, 28), np.uint8))
    monkeypatch.setattr(data.files_lib, "available_memory", lambda: 10_000)
    with pytest.raises(UserError, match=r"images-idx: header says 3x28x28 = 2352 bytes of data: loading it needs"):
        data.read_idx(path)
    monkeypatch.setattr(data.files_lib, "available_memory", lambda: None)  # unknown: no limit
    assert data.read_idx(path).shape == (3, 28, 28)


def test_empty_array_with_an_unindexable_shape_is_a_user_error(tmp_path):
    # Found by test_fuzz_headers: 0 bytes of data match the header, but numpy refuses the shape.
    path = tmp_path / "empty-idx"
    path.write_bytes(bytes([0, 0, 8, 4]) + b"".join(d.to_bytes(4, "big") for d in (0, 2**21, 2**21, 2**21)))
    with pytest.raises(UserError, match="empty-idx: header's shape 0x2097152x2097152x2097152"):
        data.read_idx(path)


def test_gzip_bomb_header_is_refused_before_reading(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4294967295, 28, 28)
    path.write_bytes(gzip.compress(header + bytes(1 << 20)))
    with pytest.raises(UserError, match="more than a .*-byte file can hold"):  # from the header alone
        data.read_idx(path, ndim=3)


# --- fuzzing: any bytes give an array that matches its header, or one UserError naming the file

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_VALID = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
_VALID_RAW = bytes([0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5]) + _VALID.tobytes()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("idx_fuzz")


def _read_or_user_error(path: Path, raw_idx: bytes | None) -> None:
    """`raw_idx`: the uncompressed bytes when known, to check a returned array against them."""
    try:
        arr = data.read_idx(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert arr.dtype == np.uint8
    if raw_idx is not None:
        header_len = 4 + 4 * raw_idx[3]
        assert arr.shape == tuple(int.from_bytes(raw_idx[4 + 4 * i:8 + 4 * i], "big")
                                  for i in range(raw_idx[3]))
        assert arr.tobytes() == raw_idx[header_len:]


def _mutate(raw: bytes, cut: int, edits: list[tuple[int, int]], tail: bytes) -> bytes:
    b = bytearray(raw[:cut])
    for i, v in edits:
        if b:
            b[i % len(b)] = v
    return bytes(b) + tail


_MUTATIONS = st.tuples(st.integers(0, len(_VALID_RAW)),
                       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
                       st.binary(max_size=6))


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_random_bytes(fuzz_dir, raw, gz):
    path = fuzz_dir / ("random-idx.gz" if gz else "random-idx")
    path.write_bytes(raw)
    _read_or_user_error(path, None if gz else raw)


@FUZZ
@given(_MUTATIONS, st.sampled_from(["raw", "gz of garbled", "garbled gz"]))
def test_fuzz_garbled_valid_file(fuzz_dir, mutation, how):
    if how == "garbled gz":
        raw_idx, content = None, _mutate(gzip.compress(_VALID_RAW, mtime=0), *mutation)
    else:
        raw_idx = _mutate(_VALID_RAW, *mutation)
        content = gzip.compress(raw_idx) if how == "gz of garbled" else raw_idx
    path = fuzz_dir / ("garbled-idx" + ("" if how == "raw" else ".gz"))
    path.write_bytes(content)
    _read_or_user_error(path, raw_idx)


@FUZZ
@given(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), max_size=5), st.binary(max_size=64),
       st.booleans())
def test_fuzz_headers(fuzz_dir, dims, payload, gz):
    raw = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    path = fuzz_dir / ("header-idx.gz" if gz else "header-idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    _read_or_user_error(path, raw)


def test_valid_file_reads_back_through_the_fuzz_check(fuzz_dir):
    for name, content in (("ok-idx", _VALID_RAW), ("ok-idx.gz", gzip.compress(_VALID_RAW))):
        (fuzz_dir / name).write_bytes(content)
        np.testing.assert_array_equal(data.read_idx(fuzz_dir / name), _VALID)


# ---------------------------------------------------------------- load() from a data dir


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir(tmp_path, name, gz):
    arrays = _write_idx_set(tmp_path, gz=gz)
    ds = data.load(name, tmp_path)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (N_TRAIN, 28, 28, 1) and ds.x_test.shape == (N_TEST, 28, 28, 1)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"] / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    suffix = ".gz" if gz else ""
    assert ds.files == tuple(str((tmp_path / f"{stem}{suffix}").resolve()) for stem in data.IDX_FILES)


def test_dataset_files_are_absolute_even_for_a_relative_data_dir(tmp_path, monkeypatch):
    _write_idx_set(tmp_path / "mnist")
    monkeypatch.chdir(tmp_path)
    ds = data.load("mnist", "mnist")
    assert len(ds.files) == 4 and all(Path(f).is_absolute() and Path(f).is_file() for f in ds.files)


def test_synthetic_dataset_has_no_files():
    assert data.synthetic(n_train=20, n_test=10).files == ()


def test_raw_and_gz_with_the_same_data_load(tmp_path):
    _write_idx_set(tmp_path, gz=False, seed=1)
    arrays = _write_idx_set(tmp_path, gz=True, seed=1)
    ds = data.load("mnist", tmp_path)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])


def _differ_by_content(root):
    data.write_idx(root / "t10k-labels-idx1-ubyte", np.ones(N_TEST, np.uint8))


def _differ_by_length(root):
    raw = gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (root / "t10k-labels-idx1-ubyte").write_bytes(raw + b"\0")


def _raw_shorter(root):
    raw = gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (root / "t10k-labels-idx1-ubyte").write_bytes(raw[:-1])


def _gz_broken(root):
    raw = gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (root / "t10k-labels-idx1-ubyte").write_bytes(raw)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>404</html>")


@pytest.mark.parametrize("make_pair, how", [(_differ_by_content, "hold different data"),
                                            (_differ_by_length, "hold different data"),
                                            (_raw_shorter, "hold different data"),
                                            (_gz_broken, r"t10k-labels-idx1-ubyte\.gz is not a valid gzip file")])
def test_raw_and_gz_that_differ_are_refused_naming_both(idx_dir, make_pair, how):
    # Before: the .gz was used silently, whatever the raw file held.
    root, _ = idx_dir
    make_pair(root)
    with pytest.raises(UserError, match=r"mnist: both .*t10k-labels-idx1-ubyte and t10k-labels-idx1-ubyte\.gz "
                                        rf"exist but {how}.*; remove the one that is not from your download$"):
        data.load("mnist", root)


@pytest.mark.parametrize("name, sub", [("mnist", "mnist"), ("fashion_mnist", "fashion_mnist"),
                                       ("fashion_mnist", "fashion-mnist")])
def test_load_does_not_descend_into_a_dataset_subfolder(tmp_path, name, sub):
    # Before: the files in tmp_path/mnist were read silently.
    _write_idx_set(tmp_path / sub)
    with pytest.raises(UserError, match=f"{name}: no data files in {tmp_path}, but found them in "
                                        f"{tmp_path / sub}: pass --data-dir {tmp_path / sub} "
                                        rf"\(in a sweep, --data-dir {name}={tmp_path / sub}\)$"):
        data.load(name, tmp_path)
    assert len(data.load(name, tmp_path / sub).y_train) == N_TRAIN


def test_a_subfolder_found_from_the_env_var_says_to_change_the_env_var(tmp_path, monkeypatch):
    _write_idx_set(tmp_path / "mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError, match=rf"no data files in {tmp_path} \(from \$CI_JAX_DATA_DIR\), but found "
                                        rf"them in {tmp_path / 'mnist'}: set \$CI_JAX_DATA_DIR={tmp_path / 'mnist'}$"):
        data.load("mnist")


def test_another_datasets_subfolder_is_no_hint(tmp_path):
    _write_idx_set(tmp_path / "mnist")
    with pytest.raises(UserError, match=f"fashion_mnist: no data files in {tmp_path}: pass --data-dir DIR"):
        data.load("fashion_mnist", tmp_path)


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_load_reports_a_data_file_that_is_not_a_file(idx_dir, no_hang, kind):
    # Before: each of these read as "missing ... next to the other IDX files" (a fifo could block).
    root, _ = idx_dir
    (root / "train-labels-idx1-ubyte.gz").unlink()
    message = _make_not_a_file(root / "train-labels-idx1-ubyte.gz", kind)
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz: " + message):
        data.load("mnist", root)


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_a_bad_entry_beside_a_good_file_is_reported(idx_dir, no_hang, kind):
    # The raw name is taken by something unreadable: not silently skipped in favour of the .gz.
    root, _ = idx_dir
    message = _make_not_a_file(root / "train-labels-idx1-ubyte", kind)
    with pytest.raises(UserError, match="train-labels-idx1-ubyte: " + message):
        data.load("mnist", root)


@pytest.mark.parametrize("kind", ["fifo", "symlink loop", "dangling link"])
def test_a_data_dir_that_is_not_a_directory_says_what_it_is(tmp_path, no_hang, kind):
    # Before: a symlink loop or a dangling link "does not exist".
    message = _make_not_a_file(tmp_path / "data", kind).split(", not")[0]
    with pytest.raises(UserError, match=f"mnist: data dir .*data {message}, not a directory: pass --data-dir"):
        data.load("mnist", tmp_path / "data")


def test_env_var_is_honored(idx_dir, monkeypatch):
    root, arrays = idx_dir
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root))
    ds = data.load("mnist")
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    # An explicit data_dir wins over the environment.
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root / "nowhere"))
    assert len(data.load("mnist", root).y_train) == N_TRAIN
    with pytest.raises(UserError, match=r"nowhere \(from \$CI_JAX_DATA_DIR\) does not exist"):
        data.load("mnist")


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown dataset 'svhn': \(choose one of mnist, fashion_mnist, cifar10, cifar100, gtsrb\)"):
        data.load("svhn", "/tmp")


def test_missing_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"data dir .*missing_dir.* does not exist: pass --data-dir DIR"):
        data.load("mnist", tmp_path / "missing_dir")


def test_empty_data_dir(tmp_path):
    with pytest.raises(UserError, match="no data files in .*omit it to download with tensorflow-datasets"):
        data.load("mnist", tmp_path)


def _truncate(root):
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())[:16 + 1000])
    (root / "train-images-idx3-ubyte.gz").unlink()
    # Uncompressed, the file's size gives it away before anything is read.
    return path.name, (f"header says {N_TRAIN}x28x28 = {N_TRAIN * 784} bytes of data, more than a 1016-byte "
                       "file can hold; the file is corrupt")


def _truncate_gz(root):
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:16 + 1000]))
    return path.name, f"truncated: header says {N_TRAIN}x28x28 = {N_TRAIN * 784} bytes of data, file has 1000"


def _set_byte(stem, index, value):
    def corrupt(root):
        path = root / f"{stem}.gz"
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[index] = value
        path.write_bytes(gzip.compress(bytes(raw)))
        return path.name, "not an IDX file" if index < 2 else "data type 0x0d is not supported"
    return corrupt


def _garbage_gz(root):
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    return path.name, "not a valid gzip file"


def _cut_gz(root):
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    return path.name, "not a valid gzip file"


def _missing(root):
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    return "t10k-images-idx3-ubyte", "missing .*t10k-images-idx3-ubyte.*--data-dir"


def _label_count(root):
    data.write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(N_TRAIN - 1, np.uint8))
    return "train-labels-idx1-ubyte.gz", f"has {N_TRAIN - 1} labels but train-images-idx3-ubyte.gz has {N_TRAIN} images"


def _label_range(root):
    labels = np.zeros(N_TEST, np.uint8)
    labels[3] = 10
    data.write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    return "t10k-labels-idx1-ubyte.gz", r"label 10 at index 3 is outside 0\.\.9"


def _swapped(root):
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    return "t10k-labels-idx1-ubyte.gz", "has 3 dimensions, expected 1"


def _image_size(root):
    data.write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((N_TRAIN, 32, 32), np.uint8))
    return "train-images-idx3-ubyte.gz", "images are 32x32, expected 28x28"


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _truncate_gz, _set_byte("train-images-idx3-ubyte", 1, 0x08),
     _set_byte("t10k-labels-idx1-ubyte", 2, 0x0D), _garbage_gz, _cut_gz, _missing, _label_count, _label_range,
     _swapped, _image_size],
    ids=["truncated", "truncated_gz", "magic", "type_byte", "garbage_gz", "cut_gz", "missing", "label_count",
         "label_range", "swapped", "image_size"],
)
def test_corrupt_files_raise_user_error_naming_the_file(idx_dir, corrupt):
    root, _ = idx_dir
    file_name, message = corrupt(root)
    with pytest.raises(UserError, match=message) as info:
        data.load("mnist", root)
    assert file_name in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- CIFAR-10 binary version


def _write_cifar(root: Path, per_file: int = 3):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*data.CIFAR_TRAIN_FILES, data.CIFAR_TEST_FILE):
        labels_N = rng.integers(0, 10, per_file, dtype=np.uint8)
        x_NCHW = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels_N[:, None], x_NCHW.reshape(per_file, -1)], axis=1)
        (root / name).write_bytes(records.tobytes())
        written[name] = (x_NCHW, labels_N)
    return written


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_load_cifar10_binary(tmp_path, subdir):
    written = _write_cifar(tmp_path / subdir if subdir else tmp_path)
    ds = data.load("cifar10", tmp_path / subdir)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    x_NCHW, y_N = written["data_batch_2.bin"]
    np.testing.assert_array_equal(ds.y_train[3:6], y_N)
    # Pixel (row 5, col 7) of channel 2 of the first record of batch 2, now NHWC.
    assert ds.x_train[3, 5, 7, 2] == pytest.approx(x_NCHW[0, 2, 5, 7] / 255)
    np.testing.assert_array_equal(ds.y_test, written["test_batch.bin"][1])
    root = (tmp_path / subdir if subdir else tmp_path).resolve()
    assert ds.files == tuple(str(root / f) for f in (*data.CIFAR_TRAIN_FILES, data.CIFAR_TEST_FILE))


def test_cifar10_bad_size_and_missing_file(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(UserError, match="data_batch_3.bin: 3000 bytes is not a whole number of 3073-byte"):
        data.load("cifar10", tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(UserError, match="cifar10: missing .*data_batch_3.bin"):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize("sub", ["cifar-10-batches-bin", "cifar10", "cifar10/cifar-10-batches-bin"])
def test_cifar10_does_not_descend_into_a_subfolder(tmp_path, sub):
    # Before: any of these subfolders was read silently.
    _write_cifar(tmp_path / sub)
    with pytest.raises(UserError, match=f"cifar10: no data files in {tmp_path}, but found them in "
                                        f"{tmp_path / sub}: pass --data-dir {tmp_path / sub} "):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_cifar10_file_that_is_not_a_file_says_what_it_is(tmp_path, no_hang, kind):
    # Before: reported as "missing" (and np.fromfile on a fifo blocked).
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_4.bin").unlink()
    message = _make_not_a_file(tmp_path / "data_batch_4.bin", kind)
    with pytest.raises(UserError, match="data_batch_4.bin: " + message):
        data.load("cifar10", tmp_path)


def test_cifar10_label_out_of_range(tmp_path):
    _write_cifar(tmp_path)
    raw = bytearray((tmp_path / "test_batch.bin").read_bytes())
    raw[data.CIFAR_RECORD_BYTES] = 11  # label byte of the second record
    (tmp_path / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"test_batch.bin: label 11 at index 1"):
        data.load("cifar10", tmp_path)


# ---------------------------------------------------------------- RGB datasets from files in their own layouts
# CIFAR-10 and CIFAR-100 (python version) and GTSRB (official and torchvision folders), read from
# synthetic files written in those exact layouts.

# Four classes, each its own colour and stripe direction and frequency, drawn in continuous
# coordinates so that an image of any size shows the same pattern (what the GTSRB resize must keep).
COLOURS_K3 = np.array([[0.8, 0.2, 0.2], [0.2, 0.7, 0.2], [0.2, 0.3, 0.8], [0.7, 0.7, 0.2]], np.float32)


def pattern(c: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8: class c's colour, modulated by its stripes, with per-image noise and brightness."""
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    along = v if c % 2 == 0 else u
    stripes_HW = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + c) * along + rng.uniform(0, 2 * np.pi))
    img = COLOURS_K3[c] * (0.5 + 0.5 * stripes_HW[..., None]) * rng.uniform(0.8, 1.1)
    img = img + rng.normal(0, 0.05, (h, w, 3))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def rgb_split(n: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y_N = rng.permutation(np.arange(n) % classes).astype(np.int64)
    return np.stack([pattern(int(c), 32, 32, rng) for c in y_N]), y_N


def write_ppm(path: Path, img_HWC: np.ndarray) -> None:
    h, w, _ = img_HWC.shape  # binary PPM (P6), as GTSRB ships them
    path.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + img_HWC.tobytes())


GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def write_gtsrb(root: Path, n_train: int, n_test: int, classes: int, seed: int = 0,
                layout: str = "official") -> dict[str, list]:
    """Images of 15..60 pixels a side (GTSRB's range starts at 15), in the official archives' layout
    or torchvision's; returns {split: [(image, class), ...]} in the order a reader lists them."""
    rng = np.random.default_rng(seed)
    train_dir = root / ("GTSRB/Final_Training/Images" if layout == "official" else "gtsrb/GTSRB/Training")
    test_dir = root / ("GTSRB/Final_Test/Images" if layout == "official" else "gtsrb/GTSRB/Final_Test/Images")
    out = {"train": [], "test": []}
    for c in range(classes):
        folder = train_dir / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = [GT_HEADER]
        for i in range(n_train // classes):
            h, w = rng.integers(15, 61, 2)
            img = pattern(c, int(h), int(w), rng)
            name = f"{i // 30:05d}_{i % 30:05d}.ppm"  # track_image, as the archive names them
            write_ppm(folder / name, img)
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}")
            out["train"].append((img, c))
        if layout == "official":  # torchvision's Training folders are read without their CSVs
            (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    test_dir.mkdir(parents=True)
    rows = [GT_HEADER]
    for i in range(n_test):
        c = int(rng.integers(classes))
        h, w = rng.integers(15, 61, 2)
        img = pattern(c, int(h), int(w), rng)
        write_ppm(test_dir / f"{i:05d}.ppm", img)
        rows.append(f"{i:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{c}")
        out["test"].append((img, c))
    csv = test_dir / "GT-final_test.csv" if layout == "official" else root / "gtsrb/GT-final_test.csv"
    csv.write_text("\n".join(rows) + "\n")
    return out


def _cifar_dir(root: Path, n_train=40, n_test=10, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x_tr, y_tr = rgb_split(n_train, min(classes, 4), rng)
    x_te, y_te = rgb_split(n_test, min(classes, 4), rng)
    if classes == 100:
        y_tr, y_te = y_tr + 96, y_te + 96  # the top labels, 96..99
    data.write_cifar_python(root, x_tr, y_tr, x_te, y_te, num_classes=classes)
    return x_tr, y_tr, x_te, y_te


# ---------------------------------------------------------------- CIFAR python version


def test_cifar10_python_version_reads_the_pickled_batches(tmp_path):
    x_tr, y_tr, x_te, y_te = _cifar_dir(tmp_path)
    ds = data.load("cifar10", tmp_path)
    assert ds.x_train.shape == (40, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    assert ds.x_train[9, 5, 7, 2] == np.float32(x_tr[9, 5, 7, 2]) / np.float32(255)
    # The file stores channel planes: byte 2 * 1024 + 5 * 32 + 7 of the batch row is that pixel.
    with open(tmp_path / "data_batch_2", "rb") as f:
        row = pickle.load(f)["data"][1]  # image 9 is the second of batch 2 (8 per batch)
    assert row[2 * 1024 + 5 * 32 + 7] == x_tr[9, 5, 7, 2]
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
             "batches.meta"]
    assert ds.files == tuple(str((tmp_path / n).resolve()) for n in names)


def test_cifar10_binary_version_is_read_first_when_a_dir_has_both(tmp_path):
    _cifar_dir(tmp_path)
    for name in (*data.CIFAR_TRAIN_FILES, data.CIFAR_TEST_FILE):
        record = np.zeros(data.CIFAR_RECORD_BYTES, np.uint8)
        record[0] = 7
        (tmp_path / name).write_bytes(record.tobytes())
    ds = data.load("cifar10", tmp_path)
    assert len(ds.y_train) == 5 and set(ds.y_train.tolist()) == {7}


def test_cifar10_python_version_in_a_subfolder_is_named(tmp_path):
    _cifar_dir(tmp_path / "cifar-10-batches-py")
    with pytest.raises(UserError, match=f"^cifar10: no data files in {tmp_path}, but found them in "
                                        f"{tmp_path / 'cifar-10-batches-py'}: pass --data-dir "):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "data_batch_3").unlink(), r"cifar10: missing .*data_batch_3: pass --data-dir DIR holding"),
    (lambda d: (d / "test_batch").write_bytes(b"<html>not found</html>"), r"test_batch: not a CIFAR python batch"),
    (lambda d: (d / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})),
     r"test_batch: 'data' is uint8 of shape \(2, 100\), expected uint8 rows of 3072"),
    (lambda d: (d / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)})),
     r"test_batch: has no 'labels' entry \(it has data\)"),
    (lambda d: (d / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})),
     r"test_batch: label 10 at index 1 is outside 0..9"),
    (lambda d: (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"] * 100})),
     r"batches.meta: 'label_names' lists 100 classes, cifar10 has 10"),
])
def test_a_damaged_cifar10_python_file_is_one_line(tmp_path, damage, message):
    _cifar_dir(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        data.load("cifar10", tmp_path)
    assert "\n" not in str(e.value)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('ran code')",))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    _cifar_dir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": _Boom(), "labels": []}))
    with pytest.raises(UserError, match=r"data_batch_1: not a CIFAR python batch \(it names builtins.exec"):
        data.load("cifar10", tmp_path)


def test_cifar100_reads_fine_labels_of_100_classes(tmp_path):
    x_tr, y_tr, _, y_te = _cifar_dir(tmp_path, classes=100)
    ds = data.load("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.x_train.shape == (40, 32, 32, 3)
    assert ds.y_train.max() == 99 and ds.y_train.min() == 96  # fine labels, not the coarse 0s
    np.testing.assert_array_equal(ds.y_test, y_te)
    np.testing.assert_array_equal(ds.x_train[3], x_tr[3] / np.float32(255))
    assert [Path(f).name for f in ds.files] == ["train", "test", "meta"]
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["x"] * 20}, f)
    with pytest.raises(UserError, match="meta: 'fine_label_names' lists 20 classes, cifar100 has 100"):
        data.load("cifar100", tmp_path)


def test_cifar100_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match=r"^cifar100: no data files in .*CIFAR-100's python version \(train, test, "
                                        r"meta\).*cifar-100-python.tar.gz\)$"):
        data.load("cifar100", tmp_path)


# ---------------------------------------------------------------- GTSRB


def _resized(img_HWC: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img_HWC).resize((32, 32), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("layout", ["official", "torchvision"])
def test_gtsrb_reads_both_layouts_and_resizes_bilinearly(tmp_path, layout):
    written = write_gtsrb(tmp_path, n_train=12, n_test=5, classes=3, layout=layout)
    ds = data.load("gtsrb", tmp_path)
    assert ds.num_classes == 43 and ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (5, 32, 32, 3)
    assert ds.y_train.tolist() == [c for _, c in written["train"]] == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.y_test.tolist() == [c for _, c in written["test"]]
    for got, (img, _) in zip(ds.x_train, written["train"]):
        np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), _resized(img))
    csvs = [Path(f).name for f in ds.files]  # the annotation files; the arrays' hash covers the images
    assert csvs == (["GT-00000.csv", "GT-00001.csv", "GT-00002.csv"] if layout == "official" else []) \
        + ["GT-final_test.csv"]


def test_gtsrb_resize_by_hand(tmp_path):
    # A flat colour stays that colour; a 64x64 image of 2x2 blocks (left half 0, right half 200)
    # shrinks by 2: PIL's bilinear filter, widened to the scale, averages each block's 2x2 pixels
    # (weights 1/4 each), so the columns away from the edge keep 0 and 200 exactly.
    write_gtsrb(tmp_path, n_train=2, n_test=1, classes=2)
    folder = tmp_path / "GTSRB/Final_Training/Images/00001"
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 200
    write_ppm(folder / "00000_00000.ppm", halves)
    (folder / "GT-00001.csv").write_text(f"{GT_HEADER}\n00000_00000.ppm;64;64;5;5;59;59;1\n")
    class0 = tmp_path / "GTSRB/Final_Training/Images/00000"
    write_ppm(class0 / "00000_00000.ppm", np.full((17, 23, 3), 90, np.uint8))
    (class0 / "GT-00000.csv").write_text(f"{GT_HEADER}\n00000_00000.ppm;23;17;1;1;22;16;0\n")
    ds = data.load("gtsrb", tmp_path)
    flat, halves32 = np.round(ds.x_train * 255).astype(int)
    assert (flat == 90).all()
    assert (halves32[:, :15] == 0).all() and (halves32[:, 17:] == 200).all()


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "GTSRB/Final_Test/Images/GT-final_test.csv").unlink(),
     r"gtsrb: missing the test labels \(.*GT-final_test.csv or .*\): pass --data-dir DIR holding GTSRB's folders"),
    (lambda r: (r / "GTSRB/Final_Test/Images/GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n00000.ppm;30;30;5;5;25;25\n"),
     r"GT-final_test.csv: header is 'Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2', expected "
     r"Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId \(the test labels come from GTSRB_Final_Test_GT.zip"),
    (lambda r: (r / "GTSRB/Final_Training/Images/00001/GT-00001.csv").write_text(f"{GT_HEADER}\nx.ppm;9;9;1;1;8;8;2\n"),
     r"GT-00001.csv: line 2: ClassId 2, expected class 1, its folder's; re-download it"),
    (lambda r: (r / "GTSRB/Final_Training/Images/00000/00000_00001.ppm").write_bytes(b"P6\n"),
     r"00000_00001.ppm: not a readable image"),
    (lambda r: (r / "GTSRB/Final_Training/Images/00000/00000_00001.ppm").unlink(),
     r"00000_00001.ppm: no such file"),
    (lambda r: (r / "GTSRB/Final_Training/Images/00044").mkdir(),
     r"Images: has a folder '00044'; expected class folders 00000 .. 00042"),
])
def test_a_damaged_gtsrb_file_is_one_line(tmp_path, damage, message):
    write_gtsrb(tmp_path, n_train=4, n_test=2, classes=2)
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        data.load("gtsrb", tmp_path)
    assert "\n" not in str(e.value)


def test_gtsrb_without_its_folders_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match=r"^gtsrb: no GTSRB/Final_Training/Images or gtsrb/GTSRB/Training in .*"
                                        r"GTSRB_Final_Test_GT.zip.*tensorflow-datasets has no GTSRB\)$"):
        data.load("gtsrb", tmp_path)
    write_gtsrb(tmp_path / "GTSRB_Final_Training_Images", n_train=2, n_test=1, classes=2)
    with pytest.raises(UserError, match="but found them in .*GTSRB_Final_Training_Images: pass --data-dir"):
        data.load("gtsrb", tmp_path)


# ---------------------------------------------------------------- end to end: a small model learns the RGB
# layouts, and CI finds a chessboard backdoor planted in the CIFAR-layout one

E2E = {"train.model": "cnn", "train.batch_size": 32, "eval.batch_size": 100, "eval.epoch_images": 0,
       "defense.ci.k_max": 3, "defense.ci.covariance": "diag"}


@pytest.mark.slow
def test_cifar_layout_learns_and_ci_finds_a_chessboard_backdoor(tmp_path):
    rng = np.random.default_rng(1)
    x_tr, y_tr = rgb_split(600, 4, rng)
    x_te, y_te = rgb_split(200, 4, rng)
    data.write_cifar_python(tmp_path / "cifar", x_tr, y_tr, x_te, y_te)
    ds = data.load("cifar10", tmp_path / "cifar")  # the same reader as real files
    cfg = config.preset("fast", {**E2E, "data.dataset": "cifar10", "train.epochs": 4, "attack.name": "chessboard",
                                 "attack.source": 0, "attack.target": 2, "attack.n_poison": 60,
                                 "attack.chessboard.amplitude": 0.2})
    report = experiment.run(cfg, tmp_path / "run", dataset=ds, make_plots=False).to_json()
    assert report["baseline"]["clean_acc"] > 0.9  # chance: 1/4 of the four classes present
    assert report["baseline"]["asr"] > 0.8  # the chessboard is learned
    d = report["defense"]
    assert d["poisons"] == 60 and d["tpr"] >= 0.9 and d["fpr"] <= 0.02  # and CI finds it
    assert report["retrained"]["asr"] < 0.2


@pytest.mark.slow
def test_gtsrb_layout_learns_with_augmentation(tmp_path):
    write_gtsrb(tmp_path, n_train=480, n_test=160, classes=4, seed=2)
    ds = data.load("gtsrb", tmp_path)
    cfg = config.preset("fast", {**E2E, "data.dataset": "gtsrb", "train.epochs": 3, "train.augment": "dataset",
                                 "attack.name": "none", "defense.retrain": False})
    report = experiment.run(cfg, tmp_path / "run", dataset=ds, make_plots=False).to_json()
    assert report["baseline"]["clean_acc"] > 0.8  # chance: 1/4


# ---------------------------------------------------------------- tensorflow-datasets


@pytest.fixture
def tfds(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # Mocked datasets are never "prepared", which would trigger the online check.
    monkeypatch.setattr(data, "_require_network", lambda name, what: None)
    return tfds


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mocked(tfds, name, shape):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load(name)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (6, *shape) and ds.x_test.shape == (6, *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.min() >= 0 and ds.y_train.max() <= 9


def test_tfds_missing_tensorflow_is_user_error(tfds, monkeypatch):
    def data_source(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    monkeypatch.setattr(tfds, "data_source", data_source)
    with pytest.raises(UserError, match=r"missing module tensorflow: .*pip install 'ci-jax\[tfds\]'.*--data-dir"):
        data.load("mnist")


@pytest.mark.parametrize("wrapped", [False, True])
def test_tfds_network_error_is_user_error(tfds, monkeypatch, wrapped):
    import requests

    def data_source(*args, **kwargs):
        # What tfds 4.9.10 raises offline, after ~200 s of retries.
        error = requests.exceptions.ConnectionError("Failed to resolve 'storage.googleapis.com'")
        if not wrapped:
            raise error
        try:
            raise error
        except requests.exceptions.ConnectionError as e:
            raise RuntimeError("Failed to download") from e
    monkeypatch.setattr(tfds, "data_source", data_source)
    with pytest.raises(UserError, match="mnist: .*seems offline.*--data-dir"):
        data.load("mnist")


def test_offline_check_fails_fast(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(data.socket, "create_connection", no_network)
    monkeypatch.setattr(data.urllib.request, "getproxies", lambda: {})
    with pytest.raises(UserError, match=r"cifar10: .*seems offline \(\[Errno -2\] Name or service not known\)"):
        data._require_network("cifar10", data._CIFAR_WHAT)


# ---------------------------------------------------------------- synthetic


def test_synthetic_shapes_range_and_balance():
    ds = data.synthetic(n_train=300, n_test=100, num_classes=5, image_size=16, channels=3, seed=3)
    assert ds.name == "synthetic" and ds.num_classes == 5
    assert ds.x_train.shape == (300, 16, 16, 3) and ds.x_test.shape == (100, 16, 16, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert np.bincount(ds.y_train, minlength=5).tolist() == [60] * 5
    assert np.bincount(ds.y_test, minlength=5).tolist() == [20] * 5


def test_synthetic_is_deterministic_per_seed():
    a, b, c = data.synthetic(200, 50, seed=0), data.synthetic(200, 50, seed=0), data.synthetic(200, 50, seed=1)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.x_train, c.x_train)


def test_synthetic_is_learnable():
    # A nearest-class-mean classifier is far weaker than a CNN; if it nails the task,
    # a tiny CNN will too.
    ds = data.synthetic(n_train=500, n_test=200, seed=0)
    means_KD = np.stack([ds.x_train[ds.y_train == k].reshape(-1, 784).mean(0) for k in range(10)])
    dists_NK = ((ds.x_test.reshape(-1, 1, 784) - means_KD[None]) ** 2).sum(-1)
    assert (dists_NK.argmin(1) == ds.y_test).mean() > 0.95


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(UserError, match="synthetic: need"):
        data.synthetic(num_classes=1)


# ---------------------------------------------------------------- the real MNIST, when present


@pytest.mark.skipif(not (REAL_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST at ../shared/data/mnist")
def test_real_mnist():
    ds = data.load("mnist", REAL_MNIST)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert set(np.unique(ds.y_train).tolist()) == set(range(10))
    assert ds.y_test.min() == 0 and ds.y_test.max() == 9
    assert ds.y_train[0] == 5
