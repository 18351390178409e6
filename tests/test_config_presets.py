"""The `paper` and `cifar` presets: their values (each from the source README.md names), the model
keys of the older presets unchanged, `ci-jax run --preset paper` starting on a synthetic directory in
the CIFAR-10 python layout, and the bench's end-to-end estimate for a preset's whole run."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ci_jax import bench, cli, config, data, train


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def test_paper_preset_is_the_authors_setting():
    cfg = config.preset("paper")
    a, t, c = cfg.attack, cfg.train, cfg.defense.ci
    assert cfg.data.dataset == "cifar10"
    # zhenxianglance/RE-paper attacks_crafting.py: SC = 1, TC = 7, NUM_OF_ATTACKS = 500, 'static', 3/255.
    assert (a.name, a.source, a.target, a.n_poison, a.selection) == ("static", 1, 7, 500, "random")
    assert (a.static.amplitude, a.static.quantise) == (3 / 255, True)
    # train_models_contam.py: ResNet18, Adam lr 0.001, batch 32, 100 epochs, ToTensor only.
    assert (t.model, t.optimizer, t.lr, t.weight_decay, t.schedule) == ("resnet18", "adam", 1e-3, 0.0, "constant")
    assert (t.batch_size, t.epochs, t.augment, t.dtype) == (32, 100, "none", "float32")
    # The paper: a 2x2 mean filter, components with impurity above 0.5 removed, BIC ascent.
    assert (cfg.defense.name, c.filters, c.rule, c.tau, c.bic_search) == ("ci", ("mean2",), "threshold", 0.5, "ascent")
    assert (c.k_max, c.covariance) == (10, "full")


def test_cifar_preset_is_the_standard_strong_recipe():
    cfg = config.preset("cifar")
    t = cfg.train
    assert cfg.data.dataset == "cifar10"
    # kuangliu/pytorch-cifar main.py: SGD(lr=0.1, momentum=0.9, weight_decay=5e-4), CosineAnnealingLR(T_max=200),
    # 200 epochs, batch 128, RandomCrop(32, padding=4) + RandomHorizontalFlip.
    assert (t.model, t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay) == \
        ("resnet18", "sgd", 0.1, 0.9, False, 5e-4)
    assert (t.schedule, t.epochs, t.batch_size, t.augment) == ("cosine", 200, 128, "dataset")
    # The attack and the defense stay the defaults.
    assert (cfg.attack, cfg.defense) == (config.Config().attack, config.Config().defense)


def test_the_older_presets_keep_their_model_keys():
    # Computed at 48034df, before train.dtype and these presets existed.
    before = {"default": "70ffba2524ec00ee", "fashion": "8c8a9bd803b2314f", "fast": "0a1a2eedf578e761",
              "seed": "332e439e2cf53958"}
    assert {name: config.model_key(config.preset(name), "d") for name in before} == before


def test_the_new_presets_train_models_of_their_own():
    keys = {name: config.model_key(config.preset(name), "d") for name in config.PRESETS}
    assert len(set(keys.values())) == len(keys)


def test_the_paper_schedule_is_constant_adam_and_the_cifar_one_decays_to_zero():
    paper = train.make_optimizer(config.preset("paper"), 1000)[1]
    assert [float(paper(s)) for s in (0, 500, 999)] == [pytest.approx(1e-3)] * 3
    cosine = train.make_optimizer(config.preset("cifar"), 1000)[1]
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(500)) == pytest.approx(0.05)
    assert float(cosine(1000)) == pytest.approx(0.0, abs=1e-9)


# -- `ci-jax run --preset paper` on the CIFAR-10 python layout ---------------------------------------


class _Started(Exception):
    """Raised in place of training: the run got as far as its first model."""


def _cifar10_python_dir(root, per_class=520, n_test=200, seed=0):
    rng = np.random.default_rng(seed)
    y_tr = np.repeat(np.arange(10), per_class)
    rng.shuffle(y_tr)
    y_te = rng.permutation(np.arange(n_test) % 10)
    x_tr = rng.integers(0, 256, (len(y_tr), 32, 32, 3), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    data.write_cifar_python(root, x_tr, y_tr, x_te, y_te)
    return x_tr, y_tr


@pytest.mark.slow  # builds ResNet-18: its initialisers compile for about ten seconds on a CPU
def test_run_with_the_paper_preset_starts_on_the_cifar10_python_layout(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"  # what torchvision's CIFAR10(download=True) leaves
    x_u8, y = _cifar10_python_dir(root)
    seen = {}

    def first_model(trainer, x_NHWC, y_N, ckpt_dir, key, **kwargs):
        seen.update(trainer=trainer, x=np.asarray(x_NHWC), y=np.asarray(y_N))
        raise _Started

    monkeypatch.setattr(train, "train", first_model)
    out = tmp_path / "run"
    with pytest.raises(_Started):
        cli.main(["run", "--preset", "paper", "--data-dir", str(root), "--out", str(out), "--no-plots"])

    trainer, x, y_poisoned = seen["trainer"], seen["x"], seen["y"]
    assert trainer.cfg == config.preset("paper")
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(config.to_dict(trainer.cfg)))
    # ResNet-18 for 10 classes: kuangliu/pytorch-cifar's parameter count, stored in float32.
    model = nnx.merge(trainer.eval_def, trainer.model_state)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(p.size for p in params) == 11_173_962 and {p.dtype for p in params} == {np.dtype(np.float32)}
    assert trainer.augment is None

    # 500 images of class 1 relabelled 7 in place, each +3/255 on the pixels of even row and column
    # (less where 255 clips), rounded to 8 bits; every other image as it was.
    clean = x_u8.astype(np.float32) / np.float32(255)
    changed = np.flatnonzero((x != clean).any(axis=(1, 2, 3)) | (y_poisoned != y))
    assert len(changed) == 500 and set(y[changed]) == {1} and set(y_poisoned[changed]) == {7}
    step_N = np.round((x[changed] - clean[changed]) * 255)
    grid = np.zeros((32, 32), bool)
    grid[::2, ::2] = True
    assert np.all(step_N[:, ~grid] == 0)
    expected = np.minimum(3, 255 - x_u8[changed][:, grid])
    np.testing.assert_array_equal(step_N[:, grid], expected)
    assert (x[changed] * 255 == np.round(x[changed] * 255)).all()


def test_run_with_the_paper_preset_refuses_a_set_too_small_for_its_poisons(tmp_path, capsys):
    _cifar10_python_dir(tmp_path, per_class=40, n_test=20)
    assert cli.main(["run", "--preset", "paper", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "ci-jax: error: asked for 500 poisons but class 1 has only 40 training images: " \
                  "lower --attack.n_poison"


# -- the bench's estimate of a preset's whole run ---------------------------------------------------


def test_the_estimate_counts_the_real_split_sizes_for_synthetic_stand_ins():
    stand_in = data.synthetic(n_train=20, n_test=5, num_classes=10, image_size=32, channels=3)
    assert bench.full_size("cifar10", stand_in) == (50_000, 10_000)
    assert bench.full_size("gtsrb", stand_in) == (39_209, 12_630)
    assert bench.full_size("mnist", stand_in) == (60_000, 10_000)
    real = data.Dataset("cifar10", stand_in.x_train, stand_in.y_train, stand_in.x_test, stand_in.y_test, 10)
    assert bench.full_size("cifar10", real) == (20, 5)


def test_the_estimate_trains_every_epoch_twice_at_the_chosen_dtype():
    rows = [{"stage": "train", "model": "m", "dtype": "float32", "images_per_s": 100.0},
            {"stage": "train", "model": "m", "dtype": "bfloat16", "images_per_s": 400.0},
            {"stage": "features", "model": "m", "dtype": "float32", "images_per_s": 1000.0},
            {"stage": "filtered", "model": "m", "dtype": "float32", "images_per_s": 500.0}]
    e2e = bench.end_to_end(rows, n_train=50_000, n_test=10_000, gmm_s=30.0, model="m", epochs=100, dtype="float32")
    # 100 epochs of 50,000 images at 100 images/s, for the baseline and again for the retraining.
    assert e2e["parts_s"] == {"train_baseline": 50_000.0, "features": 50.0, "filtered": 100.0, "gmm": 30.0,
                              "retrain": 50_000.0, "test_passes": 20.0}
    assert (e2e["epochs"], e2e["dtype"], e2e["seconds"]) == (100, "float32", 100_200.0)
    # bfloat16 has a train row but no pass rows: no estimate.
    assert bench.end_to_end(rows, 50_000, 10_000, 30.0, "m", 100, "bfloat16") is None
    # A preset trains at its own batch size: a faster step at another batch does not count.
    batched = [{**r, "batch": 32} for r in rows] + [{"stage": "train", "model": "m", "dtype": "float32",
                                                      "batch": 128, "images_per_s": 1000.0}]
    assert bench.end_to_end(batched, 50_000, 10_000, 30.0, "m", 100, "float32", train_batch=32)["seconds"] == 100_200.0
    assert bench.end_to_end(batched, 50_000, 10_000, 30.0, "m", 100, "float32")["parts_s"]["retrain"] == 5_000.0
