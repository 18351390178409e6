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


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots draw, kept for inspection (still saved and closed)."""
    kept = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (kept.append(fig), real(fig, path)))
    return kept


def _lines_with_several_points(ax):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "") and len(ln.get_xdata()) > 1]


def test_sweep_field_draws_names_as_bars_and_numbers_as_lines(tmp_path, figures):
    e = lambda tpr: _entry(tpr=(tpr, 0.01), fpr=(0.02, 0.0), clean_after=(0.99, 0.0), asr_after=(0.01, 0.0))
    names = {"attack=pixel": [("ci", e(0.9)), ("ss", e(0.5))], "attack=patch": [("ss", e(0.4)), ("ac", e(0.3))]}
    plots.sweep_field(tmp_path / "defense.name.png", "defense.name", names, ("tpr", "fpr", "clean_after", "asr_after"))
    (fig,) = figures
    ax = fig.axes[0]
    assert _lines_with_several_points(ax) == []  # no line joins ci to ss
    # Two series over the three names ci, ss, ac: 2 + 2 bars, each series' bar above its own name.
    heights = sorted((round(p.get_x() + p.get_width() / 2, 2), round(p.get_height(), 2)) for p in ax.patches)
    assert heights == [(-0.2, 0.9), (0.8, 0.5), (1.2, 0.4), (2.2, 0.3)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ci", "ss", "ac"]
    figures.clear()
    taus = {"all": [("1000.0", e(0.1)), ("0.5", e(0.9)), ("2.0", e(0.6))]}
    plots.sweep_field(tmp_path / "tau.png", "defense.ci.tau", taus, ("tpr", "fpr", "clean_after", "asr_after"))
    (line,) = _lines_with_several_points(figures[0].axes[0])
    assert list(line.get_xdata()) == [0.5, 2.0, 1000.0] and list(line.get_ydata()) == [0.9, 0.6, 0.1]
    assert len(figures[0].axes[0].patches) == 0 and figures[0].axes[0].get_xscale() == "log"  # 1000 / 0.5 >= 50


def test_sweep_field_leaves_out_the_panels_no_run_has(tmp_path, figures):
    # A detection-only sweep: no clean accuracy or ASR after retraining. Without poisons: no TPR either.
    series = {"all": [(x, _entry(tpr=(0.9, 0.0), fpr=(0.02, 0.01))) for x in ("0.5", "1.0")]}
    plots.sweep_field(tmp_path / "a.png", "defense.ci.tau", series, ("tpr", "fpr", "clean_after", "asr_after"))
    assert [ax.get_title() for ax in figures[0].axes] == ["tpr", "fpr"]
    series = {"all": [(x, _entry(fpr=(0.02, 0.01))) for x in ("0", "1")]}
    plots.sweep_field(tmp_path / "b.png", "attack.n_poison", series, ("tpr", "fpr", "clean_after", "asr_after"))
    assert [ax.get_title() for ax in figures[1].axes] == ["fpr"]
    plots.sweep_field(tmp_path / "c.png", "attack.n_poison", {"all": [("0", _entry())]}, ("tpr", "asr_after"))
    assert_png(tmp_path / "c.png")  # nothing to draw: a note, not an empty grid of panels


def test_defense_grid_colour_counts_the_false_positives(tmp_path, figures):
    cell = lambda tpr, fpr: _entry(tpr=None if tpr is None else (tpr, 0.0), fpr=(fpr, 0.0))
    cells = {("pixel", "ci"): cell(1.0, 0.0), ("pixel", "ss"): cell(1.0, 0.136), ("none", "ci"): cell(None, 0.05)}
    plots.defense_grid(tmp_path / "grid.png", "mnist", ["pixel", "none"], ["ci", "ss"], cells)
    (fig,) = figures
    ax = fig.axes[0]
    colour = ax.images[0].get_array()
    # TPR - FPR: 1 - 0 and 1 - 0.136; no TPR without poisons, and a missing cell, are masked (grey).
    assert colour[0, 0] == 1.0 and colour[0, 1] == pytest.approx(0.864)
    assert colour.mask.tolist() == [[False, False], [True, True]]
    assert "TPR - FPR" in ax.get_title() and len(fig.axes) == 2  # the grid and its colour bar
    assert fig.axes[1].get_ylabel() == "TPR - FPR (colour)"


def test_roc_has_a_log_fpr_axis_with_zero_at_its_left_edge(tmp_path, figures):
    plots.roc(tmp_path / "roc.png", {"ci": (np.array([0.0, 0.0, 0.004, 1.0]), np.array([0.0, 0.9, 1.0, 1.0]), 0.99)})
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlim() == pytest.approx((0.002, 1.0))
    assert list(ax.get_lines()[1].get_xdata()) == [0.002, 0.002, 0.004, 1.0]  # FPR 0 at half the smallest FPR
    plots.roc(tmp_path / "roc_none.png", {})
    assert figures[1].axes[0].get_xscale() == "linear"


def test_loss_curves_draw_clean_accuracy_and_asr_per_epoch_beside_the_loss(tmp_path, figures):
    log = [{"step": 25, "epoch": 0, "loss": 2.0}, {"epoch": 0, "mean_loss": 1.2, "clean_acc": 0.9, "asr": 0.5},
           {"step": 50, "epoch": 1, "loss": 0.5}, {"epoch": 1, "mean_loss": 0.4, "clean_acc": 0.95, "asr": 0.99}]
    clean_only = [{"step": 25, "epoch": 0, "loss": 1.0}, {"epoch": 0, "mean_loss": 1.0, "clean_acc": 0.8, "asr": None}]
    plots.loss_curves(tmp_path / "loss.png", {"baseline": log, "retrained": clean_only})
    loss_ax, score_ax = figures[-1].axes
    assert loss_ax.get_yscale() == "log" and score_ax.get_xlabel() == "epoch"
    lines = {line.get_label(): line for line in score_ax.get_lines()}
    assert set(lines) == {"baseline clean", "baseline ASR", "retrained clean"}  # no ASR without an attack
    assert list(lines["baseline clean"].get_xdata()) == [1, 2]
    assert list(lines["baseline ASR"].get_ydata()) == [50.0, 99.0]
    plots.loss_curves(tmp_path / "old.png", {"baseline": log[:1]})  # a log from before epoch scores
    assert len(figures[-1].axes) == 1
