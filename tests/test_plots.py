import numpy as np
import pytest

from ci_jax import plots

PNG_MAGIC = b"\x89PNG"


def assert_png(path):
    assert path.read_bytes()[:4] == PNG_MAGIC
    # atomic_write leaves ".name.*.tmp" beside the target if anything goes wrong
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    assert plots.plt.get_fignums() == []


def test_examples_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((5, 8, 8, 1), dtype=np.float32)
    x_trig = x.copy()
    x_trig[:, 6, 6, :] = 1.0
    out = tmp_path / "sub" / "examples_gray.png"
    plots.examples(out, {"pixel": (x, x_trig, np.zeros(5, int), np.full(5, 7))}, n=4)
    assert_png(out)


def test_examples_rgb_fewer_than_n(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.5, (3, 8, 8, 3))  # out of [0, 1] on purpose: must be clipped
    out = tmp_path / "examples_rgb.png"
    plots.examples(out, {"blend": (x, x, np.arange(3), np.arange(3))}, n=8)  # no change: difference 0
    assert_png(out)


def test_examples_of_several_attacks_of_different_lengths(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((6, 8, 8, 1), dtype=np.float32)
    out = tmp_path / "examples_many.png"
    plots.examples(out, {"pixel": (x, x + 0.25, np.zeros(6), np.ones(6)),
                         "faint": (x[:2], x[:2] + 3 / 255, np.zeros(2), np.zeros(2)),
                         "empty": (x[:0], x[:0], np.zeros(0), np.zeros(0))}, n=8)
    assert_png(out)


@pytest.mark.parametrize("n", [0, 8])
def test_examples_no_images(tmp_path, n):
    empty = np.zeros((0, 8, 8, 1))
    out = tmp_path / "examples_empty.png"
    plots.examples(out, {"none": (empty, empty, np.zeros(0), np.zeros(0))}, n=n)
    assert_png(out)
    plots.examples(out, {}, n=n)
    assert_png(out)


def test_loss_curves(tmp_path):
    log = [{"step": 25, "epoch": 0, "loss": 2.0, "lr": 1e-3}, {"step": 50, "epoch": 0, "loss": 0.5},
           {"epoch": 0, "mean_loss": 1.2, "seconds": 3.0}]  # a per-epoch line: not a point
    out = tmp_path / "loss.png"
    plots.loss_curves(out, {"baseline": log, "retrained": log[:1]})
    assert_png(out)


def test_loss_curves_without_logs(tmp_path):
    out = tmp_path / "loss_none.png"
    plots.loss_curves(out, {"baseline": [], "retrained": [{"epoch": 0, "mean_loss": 1.0}]})
    assert_png(out)
    plots.loss_curves(out, {})
    assert_png(out)


def make_classes():
    return [
        {"label": 0, "k": 2, "bic": [10.0, 5.0, 7.0],
         "components": [{"size": 40, "impurity": 0.1, "flagged": False},
                        {"size": 5, "impurity": 0.9, "flagged": True, "poisons": 5}]},
        {"label": 1, "k": 1, "bic": [3.0],
         "components": [{"size": 50, "impurity": 0.2, "flagged": False, "poisons": 0}]},
        {"label": 2, "k": 3, "bic": [9.0, 8.0, 4.0, 6.0],
         "components": [{"size": 20, "impurity": 0.3, "flagged": False},
                        {"size": 20, "impurity": 0.5, "flagged": True, "poisons": 2},
                        {"size": 10, "impurity": 0.05, "flagged": False}]},
    ]


def test_bic_curves(tmp_path):
    out = tmp_path / "bic.png"
    plots.bic_curves(out, make_classes())
    assert_png(out)


def test_bic_curves_edge_cases(tmp_path):
    out = tmp_path / "bic_none.png"
    plots.bic_curves(out, [])
    assert_png(out)
    out = tmp_path / "bic_odd.png"
    plots.bic_curves(out, [{"label": 0, "k": 1, "bic": [1.0], "components": []},
                           {"label": 1, "k": None, "bic": [], "components": []}])
    assert_png(out)


@pytest.mark.parametrize("rule,tau", [("threshold", 0.4), ("threshold", None), ("top1", 0.4), ("test", None)])
def test_impurities(tmp_path, rule, tau):
    out = tmp_path / "impurities.png"
    plots.impurities(out, make_classes(), tau=tau, rule=rule)
    assert_png(out)


def test_impurities_edge_cases(tmp_path):
    out = tmp_path / "imp_none.png"
    plots.impurities(out, [], tau=0.5, rule="threshold")
    assert_png(out)
    out = tmp_path / "imp_empty_class.png"
    plots.impurities(out, [{"label": 0, "k": 1, "bic": [1.0], "components": []}],
                     tau=None, rule="threshold")
    assert_png(out)


def test_roc(tmp_path):
    out = tmp_path / "roc.png"
    plots.roc(out, {
        "ci": (np.array([0.0, 0.1, 1.0]), np.array([0.0, 0.9, 1.0]), 0.9981),
        "spectral": (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0]), None),
    })
    assert_png(out)


def test_roc_edge_cases(tmp_path):
    out = tmp_path / "roc_none.png"
    plots.roc(out, {})
    assert_png(out)
    out = tmp_path / "roc_empty.png"
    plots.roc(out, {"empty": (np.zeros(0), np.zeros(0), float("nan"))})
    assert_png(out)


def test_overwrite_keeps_single_file(tmp_path):
    out = tmp_path / "roc.png"
    plots.roc(out, {})
    plots.roc(out, {"a": (np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)})
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def _entry(**metrics):
    return {m: metrics.get(m) for m in ("tpr", "fpr", "clean_after", "asr_after")}


@pytest.mark.parametrize("xs", [["0.01", "0.1", "1.0", "10.0"], ["mean2", "median3"], ["5"]])
def test_sweep_field(tmp_path, xs):
    series = {f"seed group {g}": [(x, _entry(tpr=(0.9, 0.01), fpr=(0.01 * i, 0.0), clean_after=(0.99, 0.0),
                                             asr_after=(0.0, 0.0))) for i, x in enumerate(xs)]
              for g in range(2)}
    out = tmp_path / "defense.ci.tau.png"
    plots.sweep_field(out, "defense.ci.tau", series, ("tpr", "fpr", "clean_after", "asr_after"))
    assert_png(out)


def test_sweep_field_with_a_metric_no_run_has(tmp_path):
    # Without poisons TPR is undefined for every run; without retraining so are the after metrics.
    series = {"all": [(x, _entry(fpr=(0.02, 0.01))) for x in ("0", "1")]}
    out = tmp_path / "attack.n_poison.png"
    plots.sweep_field(out, "attack.n_poison", series, ("tpr", "fpr", "clean_after", "asr_after"))
    assert_png(out)
