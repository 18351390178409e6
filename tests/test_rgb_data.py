"""CIFAR-10 and CIFAR-100 (python version) and GTSRB (official and torchvision folders), read from
synthetic files written in those exact layouts; end to end, a small model learns them and CI finds a
chessboard backdoor planted in the CIFAR-layout one."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ci_jax import config, data, experiment
from ci_jax.errors import UserError

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


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


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


# ---------------------------------------------------------------- end to end

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
