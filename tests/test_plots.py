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
    plots.examples(out, x, x_trig, np.zeros(5, int), np.full(5, 7), trigger_rc=(6, 6), n=4)
    assert_png(out)


def test_examples_rgb_fewer_than_n(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.5, (3, 8, 8, 3))  # out of [0, 1] on purpose: must be clipped
    out = tmp_path / "examples_rgb.png"
    plots.examples(out, x, x, np.arange(3), np.arange(3), n=8)
    assert_png(out)


@pytest.mark.parametrize("n", [0, 8])
def test_examples_no_images(tmp_path, n):
    empty = np.zeros((0, 8, 8, 1))
    out = tmp_path / "examples_empty.png"
    plots.examples(out, empty, empty, np.zeros(0), np.zeros(0), trigger_rc=(1, 1), n=n)
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


@pytest.mark.parametrize("rule,tau", [("threshold", 0.4), ("threshold", None), ("gap", 0.4)])
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
