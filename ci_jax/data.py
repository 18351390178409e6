"""Image classification datasets as in-memory numpy arrays, each one entry of a registry.

A `DatasetSpec` says everything the rest of the project may assume about a dataset: its classes,
channels, image size, how raw pixels become [0, 1] floats, and where its arrays come from.

The built-in ones have up to two sources: a local data dir (IDX files for MNIST / Fashion-MNIST,
the binary or python version of CIFAR-10, the python version of CIFAR-100, GTSRB's PPM folders,
which need PIL), or tensorflow-datasets (not GTSRB), read through `tfds.data_source` because that
path decodes with numpy/PIL and never imports TensorFlow. Preparing (downloading) a tfds dataset, however, does need TensorFlow;
see `_load_tfds`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import math
import os
import pickle
import socket
import stat
import struct
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from ci_jax import files as files_lib
from ci_jax.errors import UserError, one_line
from ci_jax.registry import Names, Registry

DATA_DIR_ENV = "CI_JAX_DATA_DIR"

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_SUBDIR = "cifar-10-batches-bin"  # what cifar-10-binary.tar.gz extracts to
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32

_IDX_UBYTE = 0x08
_MAX_EXCESS_COUNTED = 1 << 26


def _how_to_get(spec: DatasetSpec) -> str:
    tfds = ", or omit it to download with tensorflow-datasets" if spec.tfds_name else ""
    return f"pass --data-dir DIR holding {spec.files}{tfds}{spec.where_to_get}"


_IDX_WHAT = "the four IDX files (train-images-idx3-ubyte[.gz], ...)"
_CIFAR_WHAT = ("CIFAR-10's binary version (data_batch_1.bin .. data_batch_5.bin, test_batch.bin) or its python "
               "version (data_batch_1 .. data_batch_5, test_batch, batches.meta)")
_CIFAR_GET = " (https://www.cs.toronto.edu/~kriz/cifar.html: cifar-10-binary.tar.gz or cifar-10-python.tar.gz)"
_CIFAR100_WHAT = "CIFAR-100's python version (train, test, meta)"
_CIFAR100_GET = " (https://www.cs.toronto.edu/~kriz/cifar.html: cifar-100-python.tar.gz)"


# eq=False: the generated __eq__/__hash__ would compare/hash arrays, which numpy cannot do.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    x_train: np.ndarray = dataclasses.field(repr=False)  # (N, H, W, C) float32 in [0, 1]
    y_train: np.ndarray = dataclasses.field(repr=False)  # (N,) int32
    x_test: np.ndarray = dataclasses.field(repr=False)
    y_test: np.ndarray = dataclasses.field(repr=False)
    num_classes: int
    # Absolute paths of the files the arrays were read from; () when they came from elsewhere
    # (tfds, synthetic). Lets provenance.record hash exactly what a run used.
    files: tuple[str, ...] = ()

    @functools.cached_property
    def sha256(self) -> str:
        """A hash of the loaded arrays (whatever their file format): part of every model's key."""
        from ci_jax import provenance

        return provenance.sha256_arrays(self.x_train, self.y_train, self.x_test, self.y_test)


# Reads a data dir: (spec, data_dir, source) -> Dataset; `source` says where the dir came from
# (" (from $CI_JAX_DATA_DIR)" or ""), for messages.
ReadDir = Callable[["DatasetSpec", Path, str], Dataset]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset, as the registry knows it. Its arrays come from, in this order: `read_dir` when
    a data dir is given (--data-dir or $CI_JAX_DATA_DIR), else `generate` (made in memory), else
    tensorflow-datasets' `tfds_name`. A spec needs at least one of them."""

    name: str
    num_classes: int
    channels: int
    image_size: int  # square images: image_size x image_size pixels
    read_dir: ReadDir | None = None
    generate: Callable[[DatasetSpec], Dataset] | None = None
    tfds_name: str | None = None
    files: str = "its files"  # what a data dir holds, for messages
    where_to_get: str = ""  # where the files are to be had offline, appended to messages
    # Images in the full training and test splits, where fixed: what bench's end-to-end estimate
    # counts when it times synthetic stand-ins.
    train_size: int | None = None
    test_size: int | None = None
    # Normalisation: floats = raw / pixel_max, in [0, 1]. No mean/std standardisation: every
    # trigger (amplitudes, clipping, blends) is defined on [0, 1] images.
    pixel_max: float = 255.0
    # Augmentation policy (train.augment dataset): a random crop after zero padding always; a
    # horizontal flip only where a mirror image keeps its class (natural images, not digits or
    # traffic signs, whose mirror image is another class or none).
    flips: bool = False

    def __post_init__(self) -> None:
        if self.read_dir is None and self.generate is None and self.tfds_name is None:
            raise ValueError(f"dataset {self.name!r}: give read_dir, generate or tfds_name")
        if self.num_classes < 2 or self.channels < 1 or self.image_size < 1:
            raise ValueError(f"dataset {self.name!r}: needs num_classes >= 2, channels >= 1, image_size >= 1")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, self.channels


_REGISTRY: Registry[DatasetSpec] = Registry("dataset")
# Live: the config's choices for data.dataset, so a dataset registered later is accepted.
DATASETS: Names = _REGISTRY.names


def register_dataset(spec: DatasetSpec) -> None:
    """Makes `spec.name` a dataset that `load`, the config and `ci-jax bench` accept."""
    _REGISTRY.register(spec.name, spec)


def unregister_dataset(name: str) -> None:
    _REGISTRY.unregister(name)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of `name`; UserError with the nearest name for an unknown one."""
    return _REGISTRY.get(name)


def load(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads `name` from `data_dir`, else $CI_JAX_DATA_DIR, else its generator or tensorflow-datasets."""
    spec = get_dataset(name)
    source = ""  # where a bad dir came from, so the user knows what to change
    if data_dir is None and os.environ.get(DATA_DIR_ENV) and spec.read_dir is not None:
        # Only for a dataset that reads files: the variable is a default place, not a request.
        data_dir, source = os.environ[DATA_DIR_ENV], f" (from ${DATA_DIR_ENV})"
    if data_dir is None:
        if spec.generate is not None:
            return check_fits(spec, spec.generate(spec))
        if spec.tfds_name is None:
            raise UserError(f"{name}: no data dir given: {_how_to_get(spec)}")
        return check_fits(spec, _load_tfds(spec))
    if spec.read_dir is None:
        origin = "is made in memory" if spec.generate is not None else "comes from tensorflow-datasets"
        raise UserError(f"{name}: reads no data dir (its data {origin}): drop --data-dir {data_dir}")
    data_dir = Path(data_dir).expanduser()
    kind, phrase = _path_kind(data_dir)
    if kind != "dir":
        problem = ("does not exist" if kind == "missing" else f"cannot be read ({phrase})"
                   if kind == "unreadable" else f"is {phrase}, not a directory")
        raise UserError(f"{name}: data dir {data_dir}{source} {problem}: " + _how_to_get(spec))
    return check_fits(spec, spec.read_dir(spec, data_dir, source))


def check_fits(spec: DatasetSpec, ds: Dataset) -> Dataset:
    """`ds`, once its classes, image shape and labels are those `spec` promises: the models,
    attacks and defenses are built from the spec's numbers and would fail deep inside otherwise."""
    if ds.num_classes != spec.num_classes:
        raise UserError(f"{spec.name}: the loaded data has {ds.num_classes} classes, the dataset "
                        f"declares {spec.num_classes}")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if x.shape[1:] != spec.image_shape:
            raise UserError(f"{spec.name}: its {split} images are {'x'.join(map(str, x.shape[1:]))}, "
                            f"expected {'x'.join(map(str, spec.image_shape))} (height x width x channels)")
        if len(y) != len(x):
            raise UserError(f"{spec.name}: {len(y)} {split} labels for {len(x)} {split} images")
        _check_labels(f"{spec.name} {split} split", y, spec.num_classes)
    return ds


# ---------------------------------------------------------------- files and folders


def _path_kind(path: Path) -> tuple[str, str]:
    """What is at `path`, following symlinks: (kind, phrase for an error message), kind one of
    'file' (regular), 'dir', 'missing', 'link' (dangling or a loop), 'special', 'unreadable'."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        try:
            target = os.readlink(path)
        except OSError:
            return "missing", "missing"
        return "link", f"a dangling symlink (to {target}, which does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "link", "a symlink loop"
        if e.errno == errno.ENOTDIR:  # a parent is a file: nothing can be at this path
            return "missing", "missing"
        return "unreadable", e.strerror or str(e)
    if stat.S_ISREG(mode):
        return "file", "a regular file"
    if stat.S_ISDIR(mode):
        return "dir", "a directory"
    special = {stat.S_IFIFO: "a named pipe (fifo)", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
    return "special", special.get(stat.S_IFMT(mode), "not a regular file")


def _require_file(path: Path) -> None:
    """UserError unless `path` is a regular file (or a link to one).

    Checked before any open: opening a fifo for reading blocks until someone writes to it, and a
    directory, a fifo or a broken link would otherwise all read as 'no such file'.
    """
    kind, phrase = _path_kind(path)
    if kind == "file":
        return
    if kind == "missing":
        raise UserError(f"{path}: no such file; check the path or re-download it")
    if kind == "unreadable":
        raise UserError(f"{path}: cannot read it ({phrase}); check the path and its permissions")
    if kind == "link":
        raise UserError(f"{path}: is {phrase}, not a data file; fix the link or replace it with "
                        f"the file itself")
    raise UserError(f"{path}: is {phrase}, not a regular file; put the data file itself at this path")


def _open_file(path: Path) -> BinaryIO:
    _require_file(path)
    # O_NONBLOCK: should the file be swapped for a fifo after the check, open still returns at
    # once instead of waiting for a writer; on a regular file the flag changes nothing.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    return os.fdopen(fd, "rb")


def _point_at(name: str, sub: Path, source: str) -> str:
    if source:  # the dir came from the environment, so that is what to change
        return f"set ${DATA_DIR_ENV}={sub}"
    return f"pass --data-dir {sub} (in a sweep, --data-dir {name}={sub})"


def _check_holds_files(spec: DatasetSpec, data_dir: Path, source: str, candidates: Callable[[Path], list[Path]],
                       subdirs: Sequence[Path]) -> None:
    """UserError unless some of the dataset's files are in `data_dir` itself.

    A data dir must hold the files: searching below it would silently pick whichever dataset sits
    in a subfolder. When one of `subdirs` holds them, the error names it instead.
    """
    if any(os.path.lexists(p) for p in candidates(data_dir)):  # lexists: a bad entry gets its own error later
        return
    for sub in subdirs:
        if any(os.path.lexists(p) for p in candidates(sub)):
            raise UserError(f"{spec.name}: no data files in {data_dir}{source}, but found them in {sub}: "
                            + _point_at(spec.name, sub, source))
    raise UserError(f"{spec.name}: no data files in {data_dir}{source}: " + _how_to_get(spec))


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Reads one uint8 IDX file (gzipped if the name ends in .gz); `ndim` checks the rank.

    Streams the file: the header is checked first and at most the bytes it announces (plus one,
    to notice a file that is too long) are read, so a corrupt header or a gzip bomb cannot make
    us allocate more than the file really holds.
    """
    path = Path(path)
    try:
        with _open_file(path) as f:
            if path.suffix != ".gz":
                return _read_idx_stream(f, path, ndim)
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    return _read_idx_stream(gz, path, ndim)
            except (OSError, EOFError, zlib.error) as e:
                raise UserError(
                    f"{path}: not a valid gzip file ({one_line(e, 160)}); re-download it, or store it "
                    f"uncompressed without the .gz suffix"
                ) from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path or re-download it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}); check the path") from None


def _read_idx_stream(f: BinaryIO, path: Path, ndim: int | None) -> np.ndarray:
    head = _read_at_most(f, 4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        magic = head.hex() or "empty"
        raise UserError(
            f"{path}: not an IDX file (magic number 0x{magic}, expected 0x000008NN); "
            f"check that it is the right file and not an HTML error page or an archive"
        )
    if head[2] != _IDX_UBYTE:
        raise UserError(
            f"{path}: IDX data type 0x{head[2]:02x} is not supported, only 0x08 (unsigned byte)"
        )
    rank = head[3]
    if ndim is not None and rank != ndim:
        raise UserError(
            f"{path}: has {rank} dimensions, expected {ndim} "
            f"({'images' if ndim == 3 else 'labels' if ndim == 1 else 'data'}); "
            f"check that the file is not swapped with another one"
        )
    dims = _read_at_most(f, 4 * rank)
    if len(dims) < 4 * rank:
        raise UserError(f"{path}: truncated inside its {4 + 4 * rank}-byte header; re-download it")
    shape = struct.unpack(f">{rank}I", dims)
    expected = math.prod(shape)  # exact: np.prod would wrap around in int64 for a garbled header
    _check_declared_size(path, shape, expected)
    data = _read_at_most(f, expected + 1)
    if len(data) != expected:
        problem, got = "truncated", str(len(data))
        if len(data) > expected:
            # Count the excess, but stop somewhere: a gzip bomb must not keep us busy.
            rest = _count_rest(f, _MAX_EXCESS_COUNTED)
            problem, got = "too long", str(len(data) + rest)
            if rest > _MAX_EXCESS_COUNTED:
                got = f"over {len(data) + _MAX_EXCESS_COUNTED}"
        raise UserError(
            f"{path}: {problem}: header says {'x'.join(map(str, shape))} = {expected} bytes of "
            f"data, file has {got}; re-download it"
        )
    try:
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    except ValueError:  # e.g. 0 x 2^21 x 2^21 x 2^21: empty, yet beyond what numpy can index
        raise UserError(f"{path}: header's shape {'x'.join(map(str, shape))} is not a usable "
                        f"array shape; the file is corrupt, re-download it") from None


# Deflate cannot compress better than about 1032:1 (258-byte matches coded in 2 bits): a .gz file
# that declares more data than that is corrupt or a bomb, whatever it holds.
DEFLATE_MAX_RATIO = 1032


def _check_declared_size(path: Path, shape: tuple[int, ...], expected: int) -> None:
    """UserError before reading when the header declares more data than the file can hold, or
    than memory can (the images are kept as uint8 and as float32: 5 bytes each)."""
    size = path.stat().st_size
    most = size * DEFLATE_MAX_RATIO if path.suffix == ".gz" else size
    dims = "x".join(map(str, shape))
    if expected > most:
        raise UserError(f"{path}: header says {dims} = {expected} bytes of data, more than a "
                        f"{size}-byte file can hold; the file is corrupt, re-download it")
    free = files_lib.available_memory()
    if free is not None and 5 * expected > free:
        raise UserError(f"{path}: header says {dims} = {expected} bytes of data: loading it needs "
                        f"{5 * expected // 2**20} MiB, more than the {free // 2**20} MiB available")


def _read_at_most(f: BinaryIO, n: int, chunk: int = 1 << 20) -> bytes:
    # In chunks: f.read(n) may allocate n bytes up front, and n comes from an untrusted header.
    parts, left = [], n
    while left > 0:
        part = f.read(min(chunk, left))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _count_rest(f: BinaryIO, limit: int, chunk: int = 1 << 20) -> int:
    """How many bytes are left, counting no further than just past `limit`."""
    n = 0
    while n <= limit:
        part = f.read(chunk)
        if not part:
            break
        n += len(part)
    return n


def write_idx(path: str | os.PathLike, array_uint8: np.ndarray) -> None:
    """Writes `array_uint8` as an IDX file, gzipped if the name ends in .gz."""
    path = Path(path)
    if array_uint8.dtype != np.uint8 or not 1 <= array_uint8.ndim <= 255:
        raise UserError(
            f"{path}: can only write uint8 arrays with 1..255 dims as IDX, "
            f"got {array_uint8.dtype} with shape {array_uint8.shape}"
        )
    header = bytes([0, 0, _IDX_UBYTE, array_uint8.ndim])
    header += struct.pack(f">{array_uint8.ndim}I", *array_uint8.shape)
    raw = header + np.ascontiguousarray(array_uint8).tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)  # mtime=0: same array -> same bytes
    path.write_bytes(raw)


def _read_idx_dir(spec: DatasetSpec, data_dir: Path, source: str = "") -> Dataset:
    """A dir of the four IDX files of a one-channel dataset (MNIST's layout)."""
    name = spec.name
    # Where a download or a package may have put them: mnist/, fashion_mnist/, fashion-mnist/.
    subdirs = [data_dir / d for d in dict.fromkeys((name, name.replace("_", "-")))]
    _check_holds_files(spec, data_dir, source, _idx_candidates, subdirs)
    arrays, paths = {}, []
    for stem in IDX_FILES:
        path = _idx_path(name, data_dir, stem)
        if path is None:
            raise UserError(
                f"{name}: missing {data_dir / stem}(.gz) next to the other IDX files: "
                + _how_to_get(spec)
            )
        arrays[stem] = (path, read_idx(path, ndim=1 if "labels" in stem else 3))
        paths.append(path)
    x_train_NHW, y_train_N = _check_idx_pair(spec, arrays["train-images-idx3-ubyte"],
                                             arrays["train-labels-idx1-ubyte"])
    x_test_NHW, y_test_N = _check_idx_pair(spec, arrays["t10k-images-idx3-ubyte"],
                                           arrays["t10k-labels-idx1-ubyte"])
    return _to_dataset(spec, x_train_NHW[..., None], y_train_N, x_test_NHW[..., None], y_test_N,
                       files=paths)


def _idx_path(name: str, root: Path, stem: str) -> Path | None:
    """The file to read for `stem`, None when neither it nor its .gz is there."""
    gz, raw = root / f"{stem}.gz", root / stem
    present = [p for p in (gz, raw) if os.path.lexists(p)]  # .gz first: what the mirrors serve
    for path in present:
        _require_file(path)
    if len(present) == 2:
        differ = _how_idx_differs(raw, gz)
        if differ:
            raise UserError(f"{name}: both {raw} and {gz.name} exist but {differ}; remove the one "
                            f"that is not from your download")
    return present[0] if present else None


def _how_idx_differs(raw: Path, gz: Path, chunk: int = 1 << 20) -> str:
    """'' when `gz` decompresses to exactly `raw`'s bytes, else how they differ.

    Streams both and stops at the first difference, so a gzip bomb next to a small raw file
    costs no more than the raw file's size.
    """
    try:
        with _open_file(raw) as f, _open_file(gz) as g, gzip.GzipFile(fileobj=g) as unzipped:
            while True:
                a = _read_at_most(f, chunk)
                if a != _read_at_most(unzipped, len(a) or 1):  # at raw's end: is the .gz done too?
                    return "hold different data"
                if not a:
                    return ""
    except (OSError, EOFError, zlib.error) as e:
        return f"{gz.name} is not a valid gzip file ({one_line(e, 100)})"


def _idx_candidates(root: Path) -> list[Path]:
    return [root / f"{stem}{ext}" for stem in IDX_FILES for ext in (".gz", "")]


def _check_idx_pair(spec: DatasetSpec, images: tuple[Path, np.ndarray], labels: tuple[Path, np.ndarray]):
    (x_path, x_NHW), (y_path, y_N) = images, labels
    side = spec.image_size
    if x_NHW.shape[1:] != (side, side):
        raise UserError(
            f"{x_path}: images are {x_NHW.shape[1]}x{x_NHW.shape[2]}, expected {side}x{side}; "
            f"check that these are {spec.name}'s files"
        )
    if len(y_N) != len(x_NHW):
        raise UserError(
            f"{y_path}: has {len(y_N)} labels but {x_path.name} has {len(x_NHW)} images; "
            f"both files must come from the same download"
        )
    _check_labels(y_path, y_N, spec.num_classes)
    return x_NHW, y_N


def _check_labels(where: str | Path, y_N: np.ndarray, num_classes: int) -> None:
    outside_N = (y_N < 0) | (y_N >= num_classes)
    if outside_N.any():
        bad = int(np.argmax(outside_N))
        raise UserError(
            f"{where}: label {int(y_N[bad])} at index {bad} is outside 0..{num_classes - 1}; "
            f"the file is corrupt or not a label file, re-download it"
        )


# ---------------------------------------------------------------- CIFAR-10 binary version


def _read_cifar10_dir(spec: DatasetSpec, data_dir: Path, source: str = "") -> Dataset:
    """A dir of CIFAR-10's binary version (five train batches and a test batch) or of its python
    version; the binary one first, as before the python reader existed, should a dir hold both."""
    subdirs = [data_dir / d for d in (CIFAR_SUBDIR, CIFAR10_PY_SUBDIR, spec.name, f"{spec.name}/{CIFAR_SUBDIR}",
                                      f"{spec.name}/{CIFAR10_PY_SUBDIR}")]
    _check_holds_files(spec, data_dir, source, lambda root: _cifar_candidates(root) + _cifar10_py_candidates(root),
                       subdirs)
    if not any(os.path.lexists(p) for p in _cifar_candidates(data_dir)):
        return _read_cifar10_py(spec, data_dir)
    train = [_read_cifar_bin(spec, data_dir / f) for f in CIFAR_TRAIN_FILES]
    x_train_NHWC = np.concatenate([x for x, _ in train])
    y_train_N = np.concatenate([y for _, y in train])
    x_test_NHWC, y_test_N = _read_cifar_bin(spec, data_dir / CIFAR_TEST_FILE)
    paths = [data_dir / f for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)]
    return _to_dataset(spec, x_train_NHWC, y_train_N, x_test_NHWC, y_test_N, files=paths)


def _cifar_candidates(root: Path) -> list[Path]:
    return [root / f for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)]


def _read_cifar_bin(spec: DatasetSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.lexists(path):
        hint = ""
        if (path.parent / path.stem).is_file():  # data_batch_1 without .bin: the pickled version
            hint = " (the python version's files are there too: keep one version in a dir)"
        raise UserError(f"{spec.name}: missing {path}{hint}: " + _how_to_get(spec))
    try:
        with _open_file(path) as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}); check the path") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        raise UserError(
            f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte CIFAR-10 "
            f"records (1 label byte + 3x32x32 pixels); re-download the binary version"
        )
    records_NR = raw.reshape(-1, CIFAR_RECORD_BYTES)
    y_N = records_NR[:, 0]
    _check_labels(path, y_N, spec.num_classes)
    # Records store channel planes (CHW); the rest of the project wants NHWC.
    x_NHWC = records_NR[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x_NHWC, y_N


# ---------------------------------------------------------------- CIFAR python version (pickles)

# What cifar-10-python.tar.gz / cifar-100-python.tar.gz extract to (what torchvision downloads).
CIFAR10_PY_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_PY_TEST_FILE = "test_batch"
CIFAR10_PY_META = "batches.meta"
CIFAR10_PY_SUBDIR = "cifar-10-batches-py"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_SUBDIR = "cifar-100-python"
_CIFAR_PIXELS = 3 * 32 * 32

# The only globals a CIFAR pickle names (a numpy array, pickled by Python 2's cPickle or by Python
# 3): anything else is refused, because unpickling an arbitrary file can run arbitrary code.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytearray"), ("_codecs", "encode"),
})


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data batch never does")
        return super().find_class(module, name)


def _read_pickle(spec: DatasetSpec, path: Path, keys: Sequence[str]) -> dict[str, object]:
    """The dict a CIFAR pickle holds, with str keys, once it has `keys`; UserError otherwise."""
    if not os.path.lexists(path):
        raise UserError(f"{spec.name}: missing {path}: " + _how_to_get(spec))
    try:
        with _open_file(path) as f:
            # latin1: Python 2 str keys come back as str and numpy's raw bytes survive intact.
            obj = _DataUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e}); check the path") from None
    except Exception as e:  # any unpickling failure: truncated, not a pickle, a foreign object
        raise UserError(f"{path}: not a CIFAR python batch ({one_line(e, 120)}); re-download it"
                        f"{spec.where_to_get}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, expected a dict of {', '.join(keys)}; "
                        f"re-download it{spec.where_to_get}")
    out = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        raise UserError(f"{path}: has no {missing[0]!r} entry (it has {', '.join(map(str, out)) or 'none'}); "
                        f"re-download it{spec.where_to_get}")
    return out


def _pickled_batch(spec: DatasetSpec, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x_NHWC uint8, y_N) of one pickled batch: 'data' is N rows of 3072 bytes, channel planes."""
    d = _read_pickle(spec, path, ("data", label_key))
    x_raw = np.asarray(d["data"])
    y_N = np.asarray(d[label_key])
    if x_raw.dtype != np.uint8 or x_raw.ndim != 2 or x_raw.shape[1] != _CIFAR_PIXELS:
        raise UserError(f"{path}: 'data' is {x_raw.dtype} of shape {x_raw.shape}, expected uint8 rows of "
                        f"{_CIFAR_PIXELS} (3x32x32); re-download it{spec.where_to_get}")
    if y_N.ndim != 1 or len(y_N) != len(x_raw) or not np.issubdtype(y_N.dtype, np.integer):
        raise UserError(f"{path}: {label_key!r} is not {len(x_raw)} integer labels, one per image; "
                        f"re-download it{spec.where_to_get}")
    _check_labels(path, y_N, spec.num_classes)
    return x_raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y_N


def _check_meta(spec: DatasetSpec, path: Path, names_key: str) -> None:
    """The meta file must name exactly the spec's classes: a CIFAR-100 meta in a CIFAR-10 dir (or a
    coarse-label file) would otherwise pass unnoticed."""
    names = _read_pickle(spec, path, (names_key,))[names_key]
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise UserError(f"{path}: {names_key!r} lists {count} classes, {spec.name} has {spec.num_classes}; "
                        f"check that it is {spec.name}'s file")


def _read_cifar10_py(spec: DatasetSpec, data_dir: Path) -> Dataset:
    """torchvision's `cifar-10-batches-py`: five pickled train batches, a test batch, batches.meta."""
    _check_meta(spec, data_dir / CIFAR10_PY_META, "label_names")
    train = [_pickled_batch(spec, data_dir / f, "labels") for f in CIFAR10_PY_TRAIN_FILES]
    x_test_NHWC, y_test_N = _pickled_batch(spec, data_dir / CIFAR10_PY_TEST_FILE, "labels")
    paths = [data_dir / f for f in (*CIFAR10_PY_TRAIN_FILES, CIFAR10_PY_TEST_FILE, CIFAR10_PY_META)]
    return _to_dataset(spec, np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                       x_test_NHWC, y_test_N, files=paths)


def _cifar10_py_candidates(root: Path) -> list[Path]:
    return [root / f for f in (*CIFAR10_PY_TRAIN_FILES, CIFAR10_PY_TEST_FILE, CIFAR10_PY_META)]


def _read_cifar100_dir(spec: DatasetSpec, data_dir: Path, source: str = "") -> Dataset:
    """`cifar-100-python`: pickled `train` and `test` (fine labels: 100 classes) and `meta`."""
    subdirs = [data_dir / CIFAR100_SUBDIR, data_dir / spec.name, data_dir / spec.name / CIFAR100_SUBDIR]
    _check_holds_files(spec, data_dir, source, lambda root: [root / f for f in CIFAR100_FILES], subdirs)
    _check_meta(spec, data_dir / "meta", "fine_label_names")
    x_train_NHWC, y_train_N = _pickled_batch(spec, data_dir / "train", "fine_labels")
    x_test_NHWC, y_test_N = _pickled_batch(spec, data_dir / "test", "fine_labels")
    return _to_dataset(spec, x_train_NHWC, y_train_N, x_test_NHWC, y_test_N,
                       files=[data_dir / f for f in CIFAR100_FILES])


def write_cifar_python(root: str | os.PathLike, x_train_NHWC: np.ndarray, y_train_N: np.ndarray,
                       x_test_NHWC: np.ndarray, y_test_N: np.ndarray, num_classes: int = 10) -> None:
    """Writes uint8 32x32x3 images in the layout of CIFAR's python version: for 10 classes
    cifar-10-batches-py's five train batches, test_batch and batches.meta; for 100 cifar-100-python's
    train, test and meta (fine labels). For synthetic stand-ins of the real files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for x in (x_train_NHWC, x_test_NHWC):
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3):
            raise ValueError(f"CIFAR images are uint8 32x32x3, got {x.dtype} {x.shape[1:]}")

    def dump(name: str, obj: dict) -> None:
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # what Python 2's cPickle wrote

    rows = lambda x_NHWC: np.ascontiguousarray(x_NHWC.transpose(0, 3, 1, 2).reshape(len(x_NHWC), -1))
    names = [f"class_{k}" for k in range(num_classes)]
    if num_classes == 100:
        for name, x, y in (("train", x_train_NHWC, y_train_N), ("test", x_test_NHWC, y_test_N)):
            dump(name, {"data": rows(x), "fine_labels": [int(v) for v in y], "coarse_labels": [0] * len(y)})
        dump("meta", {"fine_label_names": names, "coarse_label_names": [f"super_{k}" for k in range(20)]})
        return
    for i, part in enumerate(np.array_split(np.arange(len(y_train_N)), len(CIFAR10_PY_TRAIN_FILES))):
        dump(CIFAR10_PY_TRAIN_FILES[i], {"data": rows(x_train_NHWC[part]), "labels": [int(v) for v in y_train_N[part]]})
    dump(CIFAR10_PY_TEST_FILE, {"data": rows(x_test_NHWC), "labels": [int(v) for v in y_test_N]})
    dump(CIFAR10_PY_META, {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})


# ---------------------------------------------------------------- GTSRB (PPM folders)

GTSRB_CLASSES = 43
# The official archives (GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and
# GTSRB_Final_Test_GT.zip) and torchvision's `datasets.GTSRB` download, relative to the data dir.
GTSRB_OFFICIAL_TRAIN = Path("GTSRB/Final_Training/Images")
GTSRB_TORCHVISION_TRAIN = Path("gtsrb/GTSRB/Training")
GTSRB_TEST_IMAGES = (Path("GTSRB/Final_Test/Images"), Path("gtsrb/GTSRB/Final_Test/Images"))
# Where each layout's test labels may be: the official GT zip holds one GT-final_test.csv to put next
# to the images (as WaNet's and BackdoorBench's loaders read it) or in the data dir; torchvision
# keeps it in gtsrb/ (spelt GT-final_test.csv there; GT-Final_Test.csv is accepted too).
GTSRB_TEST_CSVS = (
    ("GTSRB/Final_Test/Images/GT-final_test.csv", "GTSRB/GT-final_test.csv", "GT-final_test.csv"),
    ("gtsrb/GT-final_test.csv", "gtsrb/GT-Final_Test.csv", "gtsrb/GTSRB/Final_Test/Images/GT-final_test.csv"),
)
_GTSRB_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_GTSRB_WHAT = ("GTSRB's folders: GTSRB/Final_Training/Images/000NN/ (PPM images and GT-000NN.csv) and "
               "GTSRB/Final_Test/Images/ with GT-final_test.csv (the official archives), or torchvision's "
               "gtsrb/GTSRB/Training/, gtsrb/GTSRB/Final_Test/Images/ and gtsrb/GT-final_test.csv")
_GTSRB_GET = (" (from https://benchmark.ini.rub.de/: GTSRB_Final_Training_Images.zip, "
              "GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip, or torchvision.datasets.GTSRB("
              "root=DIR, split=..., download=True); tensorflow-datasets has no GTSRB)")


def _read_gtsrb_dir(spec: DatasetSpec, data_dir: Path, source: str = "") -> Dataset:
    """GTSRB in either layout, every image resized to spec.image_size with PIL's bilinear filter
    (antialiased when shrinking), as the toolkits' `transforms.Resize` does; the whole image, not
    its Roi box, again as the toolkits and torchvision use it."""
    layout = next((i for i, train in enumerate((GTSRB_OFFICIAL_TRAIN, GTSRB_TORCHVISION_TRAIN))
                   if (data_dir / train).is_dir()), None)
    if layout is None:
        for sub in (data_dir / "GTSRB_Final_Training_Images", data_dir / spec.name, data_dir / "data"):
            if (sub / GTSRB_OFFICIAL_TRAIN).is_dir() or (sub / GTSRB_TORCHVISION_TRAIN).is_dir():
                raise UserError(f"{spec.name}: no data files in {data_dir}{source}, but found them in {sub}: "
                                + _point_at(spec.name, sub, source))
        raise UserError(f"{spec.name}: no {GTSRB_OFFICIAL_TRAIN} or {GTSRB_TORCHVISION_TRAIN} in "
                        f"{data_dir}{source}: " + _how_to_get(spec))
    train_dir = data_dir / (GTSRB_OFFICIAL_TRAIN, GTSRB_TORCHVISION_TRAIN)[layout]
    test_dir = data_dir / GTSRB_TEST_IMAGES[layout]
    csvs = [data_dir / p for p in GTSRB_TEST_CSVS[layout]]
    test_csv = next((p for p in csvs if os.path.lexists(p)), None)
    if not test_dir.is_dir() or test_csv is None:
        missing = test_dir if not test_dir.is_dir() else f"the test labels ({' or '.join(map(str, csvs))})"
        raise UserError(f"{spec.name}: missing {missing}: " + _how_to_get(spec))
    train_files, y_train, train_csvs = _gtsrb_train_list(spec, train_dir)
    test_files, y_test = _gtsrb_csv(spec, test_csv, test_dir, None)
    size = spec.image_size
    return _to_dataset(spec, _gtsrb_images(train_files, size), np.array(y_train), _gtsrb_images(test_files, size),
                       np.array(y_test), files=[*train_csvs, test_csv])


def _gtsrb_train_list(spec: DatasetSpec, train_dir: Path) -> tuple[list[Path], list[int], list[Path]]:
    """Every training image and its class: the class is the folder 000NN; each folder's GT-000NN.csv
    lists its images where it is there (always, in the official archive), else every .ppm in it,
    sorted, as torchvision reads it. Also returns the CSVs it read."""
    names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    bad = [n for n in names if not (len(n) == 5 and n.isdigit() and int(n) < spec.num_classes)]
    if bad or not names:
        what = f"a folder {bad[0]!r}" if bad else "no class folders"
        raise UserError(f"{train_dir}: has {what}; expected class folders 00000 .. "
                        f"{spec.num_classes - 1:05d} as the archive extracts them")
    paths, labels, csvs = [], [], []
    for name in names:
        folder, c = train_dir / name, int(name)
        csv_path = folder / f"GT-{name}.csv"
        if os.path.lexists(csv_path):
            found, ys = _gtsrb_csv(spec, csv_path, folder, c)
            csvs.append(csv_path)
        else:
            found = sorted(folder.glob("*.ppm"))
            ys = [c] * len(found)
        paths += found
        labels += ys
    if not paths:
        raise UserError(f"{train_dir}: no .ppm images in its class folders: " + _how_to_get(spec))
    return paths, labels, csvs


def _gtsrb_csv(spec: DatasetSpec, path: Path, image_dir: Path, folder_class: int | None) -> tuple[list[Path], list[int]]:
    """(image paths, classes) from a GTSRB annotation file: semicolon-separated, a header of
    Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId."""
    try:
        with _open_file(path) as f:
            lines = f.read().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({one_line(e, 120)}); re-download it{_GTSRB_GET}") from None
    rows = [[cell.strip() for cell in line.split(";")] for line in lines if line.strip()]
    if not rows or not {"Filename", "ClassId"} <= set(rows[0]):
        got = ";".join(rows[0]) if rows else "an empty file"
        raise UserError(f"{path}: header is {one_line(got, 80)!r}, expected {';'.join(_GTSRB_COLUMNS)} "
                        f"(the test labels come from GTSRB_Final_Test_GT.zip, not the images' unlabelled "
                        f"GT-final_test.test.csv){_GTSRB_GET}")
    col = {name: i for i, name in enumerate(rows[0])}
    paths, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        try:
            name, label = row[col["Filename"]], int(row[col["ClassId"]])
        except (IndexError, ValueError):
            raise UserError(f"{path}: line {line_no} ({one_line(';'.join(row), 80)!r}) has no Filename and "
                            f"integer ClassId; re-download it{_GTSRB_GET}") from None
        if not 0 <= label < spec.num_classes or (folder_class is not None and label != folder_class):
            expected = f"class {folder_class}, its folder's" if folder_class is not None else \
                f"0..{spec.num_classes - 1}"
            raise UserError(f"{path}: line {line_no}: ClassId {label}, expected {expected}; re-download it")
        if Path(name).name != name:  # a path, not a file name: would reach outside the folder
            raise UserError(f"{path}: line {line_no}: Filename {name!r} is not a plain file name")
        paths.append(image_dir / name)
        labels.append(label)
    return paths, labels


def _gtsrb_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each PPM read with PIL and resized bilinearly (PIL.Image.Resampling.BILINEAR)."""
    from PIL import Image, UnidentifiedImageError

    out_NHWC = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):  # one decode per file: the images differ in size
        _require_file(path)
        try:
            with Image.open(path) as im:
                out_NHWC[i] = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise UserError(f"{path}: not a readable image ({one_line(e, 120)}); re-download it{_GTSRB_GET}") from None
    return out_NHWC


# ---------------------------------------------------------------- tensorflow-datasets

_TFDS_HOST = ("storage.googleapis.com", 443)  # tfds asks GCS first for every dataset
_OFFLINE = (
    "{name}: tensorflow-datasets cannot download it, this machine seems offline ({err}): "
    "pass --data-dir DIR holding {what}"
)


def _load_tfds(spec: DatasetSpec) -> Dataset:
    """Reads `spec.tfds_name` with `tfds.data_source`, preparing it first if needed.

    Reading a prepared ArrayRecord dataset needs no TensorFlow. Preparing does: the MNIST
    builders read with `tf.io.gfile`, and `tfds.features.Image` encodes PNGs with TensorFlow.
    """
    name, what, tfds_name = spec.name, spec.files, spec.tfds_name
    try:
        import tensorflow_datasets as tfds

        if not tfds.builder(tfds_name).is_prepared():
            _require_network(name, what)
        train, test = tfds.data_source(tfds_name, split=["train", "test"])
    except UserError:
        raise
    except ImportError as e:
        raise UserError(
            f"{name}: tensorflow-datasets needs the missing module {e.name or e}: "
            f"install the `tfds` extra: pip install 'ci-jax[tfds]', or pass --data-dir DIR "
            f"holding {what}"
        ) from None
    except Exception as e:
        if _is_network_error(e):
            raise UserError(_OFFLINE.format(name=name, err=one_line(e, 160), what=what)) from None
        raise
    x_train_NHWC, y_train_N = _stack_tfds(train)
    x_test_NHWC, y_test_N = _stack_tfds(test)
    _check_labels(f"tensorflow-datasets {tfds_name} train split", y_train_N, spec.num_classes)
    _check_labels(f"tensorflow-datasets {tfds_name} test split", y_test_N, spec.num_classes)
    return _to_dataset(spec, x_train_NHWC, y_train_N, x_test_NHWC, y_test_N)


def _stack_tfds(source) -> tuple[np.ndarray, np.ndarray]:
    # Item by item: works for real and mocked data sources alike, and costs seconds for 60k.
    examples = [source[i] for i in range(len(source))]
    x_NHWC = np.stack([np.asarray(ex["image"], dtype=np.uint8) for ex in examples])
    y_N = np.array([int(ex["label"]) for ex in examples], dtype=np.int64)
    return x_NHWC, y_N


def _require_network(name: str, what: str) -> None:
    # Offline, tfds retries each URL ~10 times with backoff, a silent wait of minutes;
    # one quick connect lets us fail at once. Behind a proxy a direct connect proves nothing.
    if urllib.request.getproxies().get("https"):
        return
    try:
        socket.create_connection(_TFDS_HOST, timeout=5).close()
    except OSError as e:
        raise UserError(_OFFLINE.format(name=name, err=one_line(e, 160), what=what)) from None


def _is_network_error(e: BaseException) -> bool:
    import requests

    from tensorflow_datasets.core.download.util import DownloadError

    network_types = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                     DownloadError, socket.gaierror, ConnectionError, TimeoutError)
    seen = set()
    while e is not None and id(e) not in seen:  # tfds may wrap the requests error
        if isinstance(e, network_types) or type(e).__name__ == "URLError":
            return True
        seen.add(id(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


# ---------------------------------------------------------------- common


def _to_dataset(spec: DatasetSpec, x_train_NHWC, y_train_N, x_test_NHWC, y_test_N,
                files: Sequence[Path] = ()) -> Dataset:
    return Dataset(
        name=spec.name,
        x_train=_to_float(x_train_NHWC, spec.pixel_max),
        y_train=np.asarray(y_train_N, dtype=np.int32),
        x_test=_to_float(x_test_NHWC, spec.pixel_max),
        y_test=np.asarray(y_test_N, dtype=np.int32),
        num_classes=spec.num_classes,
        files=tuple(str(Path(p).resolve()) for p in files),
    )


def _to_float(x_NHWC_raw: np.ndarray, pixel_max: float) -> np.ndarray:
    return x_NHWC_raw.astype(np.float32) / np.float32(pixel_max)


# ---------------------------------------------------------------- synthetic


def synthetic(
    n_train: int = 2000,
    n_test: int = 500,
    num_classes: int = 10,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
) -> Dataset:
    """A small learnable task: each image is its class's smooth random template plus noise."""
    if n_train < 1 or n_test < 1 or num_classes < 2 or image_size < 4 or channels < 1:
        raise UserError(
            f"synthetic: need n_train, n_test >= 1, num_classes >= 2, image_size >= 4, "
            f"channels >= 1; got {n_train}, {n_test}, {num_classes}, {image_size}, {channels}"
        )
    rng = np.random.default_rng(seed)
    # 4x4 control points, bilinearly upsampled: smooth blobs that differ a lot between
    # classes at the pixel level, so even a tiny CNN separates them within an epoch.
    grid = 4
    coarse_KGGC = rng.uniform(0.0, 1.0, size=(num_classes, grid, grid, channels))
    up_SG = _linear_upsample_matrix(grid, image_size)
    templates_KSSC = np.einsum("sg,kghc,th->kstc", up_SG, coarse_KGGC, up_SG)
    x_train, y_train = _synthetic_split(rng, templates_KSSC, n_train)
    x_test, y_test = _synthetic_split(rng, templates_KSSC, n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


def _synthetic_split(rng: np.random.Generator, templates_KSSC: np.ndarray, n: int):
    num_classes = len(templates_KSSC)
    # Round-robin then shuffle: classes balanced to within one example.
    y_N = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    noise_NSSC = rng.normal(0.0, 0.15, size=(n, *templates_KSSC.shape[1:]))
    x_NSSC = np.clip(templates_KSSC[y_N] + noise_NSSC, 0.0, 1.0).astype(np.float32)
    return x_NSSC, y_N


def _linear_upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that linearly interpolates n_in control points onto n_out pixels."""
    pos_S = np.linspace(0.0, n_in - 1, n_out)
    return np.maximum(0.0, 1.0 - np.abs(pos_S[:, None] - np.arange(n_in)[None, :]))


# ---------------------------------------------------------------- the built-in datasets

_MNIST_SHAPE = dict(num_classes=10, channels=1, image_size=28, files=_IDX_WHAT, train_size=60_000,
                    test_size=10_000)
register_dataset(DatasetSpec("mnist", read_dir=_read_idx_dir, tfds_name="mnist", **_MNIST_SHAPE))
register_dataset(DatasetSpec(
    "fashion_mnist", read_dir=_read_idx_dir, tfds_name="fashion_mnist", **_MNIST_SHAPE,
    where_to_get=" (on Debian or Ubuntu, `apt-get install dataset-fashion-mnist` puts them in "
                 "/usr/share/datasets/fashion-mnist)"))
register_dataset(DatasetSpec("cifar10", num_classes=10, channels=3, image_size=32, read_dir=_read_cifar10_dir,
                             tfds_name="cifar10", files=_CIFAR_WHAT, where_to_get=_CIFAR_GET, train_size=50_000,
                             test_size=10_000, flips=True))
register_dataset(DatasetSpec("cifar100", num_classes=100, channels=3, image_size=32, read_dir=_read_cifar100_dir,
                             tfds_name="cifar100", files=_CIFAR100_WHAT, where_to_get=_CIFAR100_GET,
                             train_size=50_000, test_size=10_000, flips=True))
# 32x32 as the toolkits train on it; no tfds_name: GTSRB is not in tensorflow-datasets' catalogue.
register_dataset(DatasetSpec("gtsrb", num_classes=GTSRB_CLASSES, channels=3, image_size=32, read_dir=_read_gtsrb_dir,
                             files=_GTSRB_WHAT, where_to_get=_GTSRB_GET, train_size=39_209,
                             test_size=12_630))
