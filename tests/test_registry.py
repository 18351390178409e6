"""Models and datasets are registry entries: a toy model and a toy 3-class 16x16x3 dataset, registered
here, go through the config, the loader, a whole experiment and the bench like the built-in ones."""

import numpy as np
import pytest
from flax import nnx

from ci_jax import bench, cli, config, data, experiment, models, settings
from ci_jax.errors import UserError
from ci_jax.registry import Names, Registry

pytestmark = pytest.mark.slow  # a whole experiment runs on the registered toys

TOY_DATA, TOY_MODEL = "toy3", "toynet"
TOY_SPLITS = dict(n_train=600, n_test=300)
# Each class has its own dominant colour channel (the background) and its own bright row band.
TOY_CLASSES, TOY_SIZE, TOY_CHANNELS = 3, 16, 3


def toy_images(spec: data.DatasetSpec) -> data.Dataset:
    rng = np.random.default_rng(0)
    splits = []
    for n in (TOY_SPLITS["n_train"], TOY_SPLITS["n_test"]):
        y_N = rng.permutation(np.arange(n) % spec.num_classes).astype(np.int32)
        x_NHWC = np.full((n, spec.image_size, spec.image_size, spec.channels), 0.2, np.float32)
        for c in range(spec.num_classes):
            x_NHWC[y_N == c, :, :, c] = 0.7
            x_NHWC[y_N == c, 4 * c:4 * c + 2, :, :] += 0.2
        x_NHWC += rng.normal(0.0, 0.05, size=x_NHWC.shape).astype(np.float32)
        splits += [np.clip(x_NHWC, 0.0, 1.0), y_N]
    return data.Dataset(spec.name, *splits, num_classes=spec.num_classes)


class ToyNet(nnx.Module):
    """One conv and a dense layer: feats_BD (32 wide) is the head's input, as for every model."""

    def __init__(self, in_channels, num_classes, *, rngs, image_size, conv):
        self.conv = nnx.Conv(in_channels, 8, (3, 3), conv_general_dilated=conv, rngs=rngs)
        self.fc = nnx.Linear(image_size * image_size * 8, 32, rngs=rngs)
        self.head = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x_BHWC):
        x = nnx.relu(self.conv(x_BHWC))
        feats_BD = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(feats_BD), feats_BD


def toynet(in_channels, num_classes, seed, image_size, *, conv):
    return ToyNet(in_channels, num_classes, rngs=nnx.Rngs(seed), image_size=image_size, conv=conv)


@pytest.fixture
def toys():
    spec = data.DatasetSpec(TOY_DATA, num_classes=TOY_CLASSES, channels=TOY_CHANNELS, image_size=TOY_SIZE,
                            generate=toy_images)
    data.register_dataset(spec)
    models.register_model(TOY_MODEL, toynet)
    yield spec
    data.unregister_dataset(TOY_DATA)
    models.unregister_model(TOY_MODEL)


# -- the registry itself ------------------------------------------------------------------------
def test_names_are_a_live_view_in_registration_order():
    r = Registry("widget")
    names = r.names
    assert names == () and len(names) == 0
    r.register("b", 1)
    r.register("a", 2)
    assert names == ("b", "a") and names == ["b", "a"] and list(names) == ["b", "a"] and names[1] == "a"
    assert "a" in names and "c" not in names and ["a"] not in names  # an unhashable value is no name
    assert r.get("a") == 2 and repr(names) == "Names('b', 'a')"
    r.unregister("b")
    assert names == ("a",)
    assert isinstance(data.DATASETS, Names) and isinstance(models.MODELS, Names)


def test_a_name_registered_twice_or_unregistered_twice_is_a_programming_error():
    r = Registry("widget")
    r.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        r.register("a", 2)
    assert r.get("a") == 1  # never a silent override
    r.unregister("a")
    with pytest.raises(ValueError, match="widget 'a' is not registered"):
        r.unregister("a")
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(data.get_dataset("mnist"))


def test_the_built_in_entries_keep_their_names_and_shapes():
    assert data.DATASETS == ("mnist", "fashion_mnist", "cifar10", "cifar100", "gtsrb")
    assert models.MODELS == ("resnet20", "cnn", "resnet18", "preact_resnet18")
    shapes = {n: (s.num_classes, s.image_shape, s.train_size, s.tfds_name)
              for n in data.DATASETS for s in [data.get_dataset(n)]}
    assert shapes == {"mnist": (10, (28, 28, 1), 60_000, "mnist"),
                      "fashion_mnist": (10, (28, 28, 1), 60_000, "fashion_mnist"),
                      "cifar10": (10, (32, 32, 3), 50_000, "cifar10"),
                      "cifar100": (100, (32, 32, 3), 50_000, "cifar100"),
                      "gtsrb": (43, (32, 32, 3), 39_209, None)}  # GTSRB is not in tfds' catalogue
    assert [n for n in data.DATASETS if data.get_dataset(n).flips] == ["cifar10", "cifar100"]
    assert "apt-get install dataset-fashion-mnist" in data.get_dataset("fashion_mnist").where_to_get


def test_a_spec_needs_a_source():
    with pytest.raises(ValueError, match="give read_dir, generate or tfds_name"):
        data.DatasetSpec("nowhere", num_classes=2, channels=1, image_size=8)


# -- unknown names --------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: data.get_dataset("mnsit"), "unknown dataset 'mnsit': did you mean 'mnist'? "
                                        "(choose one of mnist, fashion_mnist, cifar10, cifar100, gtsrb)"),
    (lambda: data.load("cifar", "/nonexistent"), "unknown dataset 'cifar': did you mean 'cifar10'? "
                                                 "(choose one of mnist, fashion_mnist, cifar10, cifar100, gtsrb)"),
    (lambda: models.create("resnet2", 1, 10, seed=0), "unknown model 'resnet2': did you mean 'resnet20'? "
                                                      "(choose one of resnet20, cnn, resnet18, preact_resnet18)"),
    (lambda: models.get_model("cnnn"),
     "unknown model 'cnnn': did you mean 'cnn'? (choose one of resnet20, cnn, resnet18, preact_resnet18)"),
    (lambda: config.preset("default", {"data.dataset": "fashion"}),
     "unknown data.dataset 'fashion': did you mean 'fashion_mnist'? (choose one of mnist, fashion_mnist, cifar10, cifar100, gtsrb)"),
    (lambda: config.preset("default", {"train.model": "resnet"}),
     "unknown train.model 'resnet': did you mean 'resnet20'? (choose one of resnet20, cnn, resnet18, preact_resnet18)"),
])
def test_an_unknown_name_is_one_user_error_with_the_nearest_name(call, message):
    with pytest.raises(UserError) as e:
        call()
    assert str(e.value) == message


@pytest.mark.parametrize("flag, value, message", [
    ("--dataset", "cifar", "unknown dataset 'cifar': did you mean 'cifar10'?"),
    ("--models", "resnet2", "unknown model 'resnet2': did you mean 'resnet20'?"),
])
def test_bench_an_unknown_name_is_one_error_line(capsys, flag, value, message):
    assert cli.main(["bench", "--quick", flag, value]) == 2
    _, *err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ci-jax: error: {message}")


# -- registered later, accepted everywhere -----------------------------------------------------------
def test_entries_registered_later_are_config_choices_until_unregistered(toys):
    cfg = config.preset("fast", {"data.dataset": TOY_DATA, "train.model": TOY_MODEL})
    assert (cfg.data.dataset, cfg.train.model) == (TOY_DATA, TOY_MODEL)
    assert "choices: mnist, fashion_mnist, cifar10, cifar100, gtsrb, toy3;" in settings.help_text(config.PATHS["data.dataset"])
    assert "choices: resnet20, cnn, resnet18, preact_resnet18, toynet;" in settings.help_text(config.PATHS["train.model"])
    data.unregister_dataset(TOY_DATA)
    try:
        with pytest.raises(UserError, match="unknown data.dataset 'toy3'"):
            config.preset("fast", {"data.dataset": TOY_DATA})
    finally:
        data.register_dataset(toys)


def test_the_loader_checks_what_the_spec_promises(toys):
    ds = data.load(TOY_DATA)
    assert ds.name == TOY_DATA and ds.num_classes == 3
    assert ds.x_train.shape == (600, 16, 16, 3) and ds.x_test.shape == (300, 16, 16, 3)
    assert np.bincount(ds.y_train).tolist() == [200, 200, 200]
    made_in_memory = r"^toy3: reads no data dir \(its data is made in memory\): drop --data-dir /tmp$"
    with pytest.raises(UserError, match=made_in_memory):
        data.load(TOY_DATA, "/tmp")
    bad_shape = data.DatasetSpec("toy_tall", num_classes=3, channels=3, image_size=20, generate=toy_images)
    with pytest.raises(UserError, match=r"toy_tall: its train images are 16x16x3, expected 20x20x3"):
        data.check_fits(bad_shape, ds)
    two = data.DatasetSpec("toy2", num_classes=2, channels=3, image_size=16, generate=toy_images)
    with pytest.raises(UserError, match="toy2: the loaded data has 3 classes, the dataset declares 2"):
        data.check_fits(two, ds)
    relabelled = data.Dataset("toy2", ds.x_train, ds.y_train, ds.x_test, ds.y_test, num_classes=2)
    with pytest.raises(UserError, match=r"toy2 train split: label 2 at index \d+ is outside 0\.\.1"):
        data.check_fits(two, relabelled)


def test_a_dataset_with_only_a_dir_reader_asks_for_the_dir():
    spec = data.DatasetSpec("dir_only", num_classes=2, channels=1, image_size=8, read_dir=lambda s, d, src: None,
                            files="the dir_only files")
    data.register_dataset(spec)
    try:
        with pytest.raises(UserError, match="^dir_only: no data dir given: pass --data-dir DIR holding the "
                                            "dir_only files$"):
            data.load("dir_only")
    finally:
        data.unregister_dataset("dir_only")


def test_toy_model_maps_images_to_logits_and_features(toys):
    model = models.create(TOY_MODEL, 3, 3, seed=0, image_size=16)
    logits_BK, feats_BD = model(np.zeros((2, 16, 16, 3), np.float32))
    assert logits_BK.shape == (2, 3) and feats_BD.shape == (2, 32)


def test_bench_data_is_the_datasets_own_or_synthetic_of_its_shape(toys, synthetic_data):
    cifar = bench.bench_data("cifar10", None)
    assert cifar.name == "synthetic" and cifar.num_classes == 10
    assert cifar.x_train.shape == (2000, 32, 32, 3) and cifar.x_test.shape == (500, 32, 32, 3)
    mnist = bench.bench_data("mnist", None)  # today's default: 2000 + 500 synthetic MNIST-shaped images
    reference = synthetic_data(2000, 500)
    np.testing.assert_array_equal(mnist.x_train, reference.x_train)
    toy = bench.bench_data(TOY_DATA, None)  # made in memory: its own images
    assert toy.name == TOY_DATA and toy.x_train.shape == (600, 16, 16, 3)


# -- a whole experiment on the toys ------------------------------------------------------------------
def test_a_whole_experiment_runs_on_a_registered_model_and_dataset(toys, tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    cfg = config.preset("fast", {
        "data.dataset": TOY_DATA, "train.model": TOY_MODEL, "train.epochs": 4, "train.batch_size": 32,
        "eval.batch_size": 100, "attack.name": "patch", "attack.source": 0, "attack.target": 2,
        "attack.n_poison": 40, "attack.patch.row": 11, "attack.patch.col": 11,  # 3x3: inside 16x16
        "defense.ci.k_max": 3, "defense.ci.covariance": "diag"})
    report = experiment.run(cfg, tmp_path / "run", make_plots=False).to_json()  # loaded by name, through the registry
    assert report["data"]["dataset"] == TOY_DATA and report["data"]["train_images"] == 600
    assert report["data"]["test_images_scored"] == 300
    # Chance is 1/3; the colours separate the classes.
    assert report["baseline"]["clean_acc"] > 0.9 and report["retrained"]["clean_acc"] > 0.9
    assert report["attack"]["asr_measured_on"] == "test images of class 0, triggered"
    assert report["attack"]["asr_images"] == 100 and report["attack"]["poisons"] == 40
    assert report["baseline"]["asr"] > 0.9  # the patch is learned...
    d = report["defense"]
    assert [c["label"] for c in d["ci"]["classes"]] == [0, 1, 2]  # one entry per class of the spec
    assert d["poisons"] == 40 and d["clean_images"] == 560
    assert d["tpr"] >= 0.9 and d["fpr"] <= 0.02  # ...found in the target class...
    assert set(d["removed_per_class"]) == {"0", "1", "2"} and d["removed_per_class"]["2"] >= 36
    assert report["retrained"]["asr"] < 0.1  # ...and gone after retraining
