"""Image classification datasets as in-memory numpy arrays, each one entry of a registry.

A `DatasetSpec` says everything the rest of the project may assume about a dataset: its classes,
channels, image size, how raw pixels become [0, 1] floats, and where its arrays come from.

The built-in ones (mnist, fashion_mnist, cifar10) have two sources: a local data dir (IDX files
for MNIST / Fashion-MNIST, the binary version of CIFAR-10), which needs nothing but numpy, or
tensorflow-datasets, read through `tfds.data_source` because that path decodes with numpy/PIL and
never imports TensorFlow. Preparing (downloading) a tfds dataset, however, does need TensorFlow;
see `_load_tfds`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import math
import os
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
_CIFAR_WHAT = "the CIFAR-10 binary version (data_batch_1.bin .. data_batch_5.bin, test_batch.bin)"


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
    # Images in the full training split, where fixed: what bench's end-to-end estimate clusters.
    train_size: int | None = None
    # Normalisation: floats = raw / pixel_max, in [0, 1]. No mean/std standardisation: every
    # trigger (amplitudes, clipping, blends) is defined on [0, 1] images.
    pixel_max: float = 255.0

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
    """A dir of CIFAR-10's binary version: five train batches and a test batch."""
    subdirs = [data_dir / CIFAR_SUBDIR, data_dir / spec.name, data_dir / spec.name / CIFAR_SUBDIR]
    _check_holds_files(spec, data_dir, source, _cifar_candidates, subdirs)
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
            hint = " (this looks like the CIFAR-10 python version; use cifar-10-binary.tar.gz)"
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

_MNIST_SHAPE = dict(num_classes=10, channels=1, image_size=28, files=_IDX_WHAT, train_size=60_000)
register_dataset(DatasetSpec("mnist", read_dir=_read_idx_dir, tfds_name="mnist", **_MNIST_SHAPE))
register_dataset(DatasetSpec(
    "fashion_mnist", read_dir=_read_idx_dir, tfds_name="fashion_mnist", **_MNIST_SHAPE,
    where_to_get=" (on Debian or Ubuntu, `apt-get install dataset-fashion-mnist` puts them in "
                 "/usr/share/datasets/fashion-mnist)"))
register_dataset(DatasetSpec("cifar10", num_classes=10, channels=3, image_size=32, read_dir=_read_cifar10_dir,
                             tfds_name="cifar10", files=_CIFAR_WHAT, train_size=50_000))
