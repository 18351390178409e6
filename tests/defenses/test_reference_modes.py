"""The cleansers' reference modes (ci_jax/defenses/variants.py): each mode's budget and threshold on
hand-built features, STRIP's per-image overlays and cut-off rules, SCAn's threshold, the oracle
modes' report key, every variant's fields, and the README table."""

import importlib.util
import math
import types
from pathlib import Path

import numpy as np
import pytest

from ci_jax import config, defenses, experiment, metrics, parallel, settings
from ci_jax.defenses import scan, spectre, strip, variants
from ci_jax.defenses.base import Reserve, Truth, View
from ci_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    """Per-class work (SPECTRE, AC) in this process: these classes take milliseconds, worker
    processes seconds to start."""
    monkeypatch.setattr(parallel, "workers", lambda: 1)


def _settings(name, **fields):
    return getattr(config.preset("default", {f"defense.{name}.{k}": v for k, v in fields.items()}).defense, name)


def _view(feats, y, truth=None, reserve=None, predict=None, x=None, num_classes=None, **kw):
    return View(x_NHWC=x if x is not None else np.zeros((len(y), 1, 1, 1), np.float32), y_N=y, feats_ND=feats,
                pred_N=y.copy(), num_classes=num_classes or int(y.max()) + 1, predict=predict, seed=0,
                reserve=reserve, truth=truth, **kw)


def _removed_per_class(res, y):
    return [int((~res.is_clean_N)[y == c].sum()) for c in np.unique(y)]


# -- SS ---------------------------------------------------------------------------------------------
def _ss_features(sizes=(20, 40, 41)):
    """Per class, points on a line (0.001 i) and three far ones (100, 101, 102): the three have the
    highest squared centred projections."""
    feats, y = [], []
    for c, n in enumerate(sizes):
        t = np.r_[0.001 * np.arange(n - 3), 100.0, 101.0, 102.0]
        feats.append(np.stack([t, np.zeros(n)], 1))
        y.append(np.full(n, c))
    return np.concatenate(feats).astype(np.float32), np.concatenate(y).astype(np.int32)


@pytest.mark.parametrize("mode, eps, truth, removed", [
    ("percentile", 0.1, None, [3, 6, 6]),  # floor(0.15 n): 3.0, 6.0, 6.15
    ("every_class", 0.1, Truth(10, 2), [10, 15, 15]),  # min(floor(1.5 x 10), floor(n / 2))
    ("every_class", 0.1, Truth(0, None), [0, 0, 0]),  # no attack: a budget of 0
    ("target_only", 0.1, Truth(10, 2), [0, 0, 6]),  # floor(0.15 x 41) of the target only
    ("target_only", 0.3, Truth(10, 1), [0, 18, 0]),  # floor(0.45 x 40)
    ("target_only", 0.1, Truth(0, None), [0, 0, 0]),
])
def test_ss_modes_remove_their_budget_per_class(mode, eps, truth, removed):
    feats, y = _ss_features()
    res = defenses.build("ss", _settings("ss", mode=mode, eps=eps)).run(_view(feats, y, truth))
    assert _removed_per_class(res, y) == removed
    assert [c["removed"] for c in res.report["classes"]] == removed
    for c, k in enumerate(removed):  # the three far points go first
        far = np.flatnonzero(y == c)[-3:]
        assert (~res.is_clean_N[far]).sum() == min(k, 3)
    assert ("oracle" in res.report) == (mode != "percentile")
    if truth is not None and truth.poisons == 0:
        assert "nothing is removed" in res.report["oracle"]


def test_ss_oracle_modes_need_the_truth():
    feats, y = _ss_features()
    for mode in ("every_class", "target_only"):
        with pytest.raises(UserError, match="true poison count and target class"):
            defenses.build("ss", _settings("ss", mode=mode)).run(_view(feats, y))


# -- SPECTRE ----------------------------------------------------------------------------------------
def test_spectre_reference_caps():
    assert spectre.capped(1000, 5923) == 1000
    assert spectre.capped(3000, 5000) == 1650  # round(0.33 x 5000)
    assert spectre.capped(100, 400) == 40  # under 500 images: at most round(0.1 n)
    assert spectre.capped(30, 400) == 30
    assert spectre.capped(600.0, 5923) == 600  # BackdoorBench on MNIST: 1 % of 60,000
    assert spectre.capped(600.0, 300) == 30  # 600 > 0.33 x 300 -> 99 > 0.1 x 300 -> 30
    assert spectre.capped(1.8, 60) == 1


def _spectre_features(sizes=(60, 60, 80), poisons=12, d=8):
    """Three classes in d dimensions; the last `poisons` of the last class sit far along one direction."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), sizes).astype(np.int32)
    feats = rng.normal(0, 1, (len(y), d))
    feats[np.flatnonzero(y == 2)[-poisons:]] += 12 * np.eye(d)[0]
    return feats.astype(np.float32), y


@pytest.mark.parametrize("mode, truth, removed", [
    ("paper", None, [9, 9, 12]),  # round(1.5 round(0.1 n))
    ("backdoorbench", None, [3, 3, 3]),  # eps_n = int(0.01 x 200) = 2, round(1.5 x 2) = 3
    ("toolbox", Truth(12, 2), [0, 0, 12]),  # capped(12, 80) = 8, 12 from the most spiked class
    ("toolbox", Truth(0, None), [0, 0, 0]),
])
def test_spectre_modes_remove_their_budget_per_class(mode, truth, removed):
    feats, y = _spectre_features()
    res = defenses.build("spectre", _settings("spectre", mode=mode)).run(_view(feats, y, truth))
    assert _removed_per_class(res, y) == removed
    assert ("oracle" in res.report) == (mode == "toolbox")
    if mode == "toolbox" and truth.poisons:
        assert res.report["top_class"] == 2 and (~res.is_clean_N[np.flatnonzero(y == 2)[-12:]]).all()


def test_old_configs_with_only_top_class():
    cfg = config.from_dict({"defense": {"spectre": {"eps": 0.2, "only_top_class": False}}})
    assert cfg.defense.spectre.mode == "paper" and cfg.defense.spectre.eps == 0.2
    for bad in ({"defense": {"spectre": {"only_top_class": True}}}, {"defense.spectre.only_top_class": 0}):
        with pytest.raises(UserError, match="only_top_class .* is gone; see defense.spectre.mode: toolbox"):
            config.from_dict(bad)


# -- STRIP ------------------------------------------------------------------------------------------
def test_strip_overlays_are_seeded_per_image_and_pass():
    a = strip.overlay_indices(0, 0, 3, 500, 200)
    assert np.array_equal(a, strip.overlay_indices(0, 0, 3, 500, 200))
    assert not np.array_equal(a, strip.overlay_indices(1, 0, 3, 500, 200))
    assert not np.array_equal(a, strip.overlay_indices(0, 0, 4, 500, 200))
    assert not np.array_equal(a, strip.overlay_indices(0, 1, 3, 500, 200))
    assert a.min() >= 0 and a.max() < 200 and len(np.unique(a)) > 100  # images draw their own
    own = strip.overlay_indices(0, 1, 3, 200, 200, exclude_self=True)
    assert (own != np.arange(200)).all() and own.min() >= 0 and own.max() < 200


def _recording_model(seen):
    """Logits from the blended image's first pixel; records that pixel of every image passed."""
    def predict(x, transform=None, desc=None, logits=False):
        x = np.asarray(x)
        seen.append(x[:, 0, 0, 0].copy())
        out = np.stack([x[:, 0, 0, 0], np.zeros(len(x))], 1)
        return np.zeros(len(x), np.int32), np.zeros((len(x), 2)), out
    return predict


def _strip_view(n=30, m=20, seen=None, **kw):
    """Training images of 0 and a reserve whose image k is the constant k: a blend's first pixel is
    the index of its overlay."""
    y, ry = np.arange(n, dtype=np.int32) % 2, np.arange(m, dtype=np.int32) % 2
    rx = np.broadcast_to(np.arange(m, dtype=np.float32)[:, None, None, None], (m, 2, 2, 1)).copy()
    reserve = Reserve(rx, ry, np.zeros((m, 2)), ry.copy(), np.arange(m), key=f"reserve{m}-seed0")
    return _view(np.zeros((n, 2), np.float32), y, reserve=reserve, predict=_recording_model(seen),
                 x=np.zeros((n, 2, 2, 1), np.float32), **kw)


def test_strip_blends_every_image_with_its_own_seeded_overlay_in_each_pass():
    seen = []
    res = defenses.build("strip", _settings("strip", blends=3)).run(_strip_view(seen=seen))
    train, clean = seen[:3], seen[3:]
    assert len(seen) == 6
    for j in range(3):
        assert np.array_equal(train[j], strip.overlay_indices(0, 0, j, 30, 20))
        assert np.array_equal(clean[j] - np.arange(20), strip.overlay_indices(0, 1, j, 20, 20, exclude_self=True))
        assert (clean[j] != 2 * np.arange(20)).all()  # a reserve image never overlays itself
    assert len(np.unique(train[0])) > 5
    assert res.report["blend_images"] == 3 and res.report["clean_images_for_cut_off"] == 20


def test_strip_entropies_are_cached_under_a_name_that_says_what_they_depend_on(tmp_path):
    seen = []
    view = lambda: _strip_view(seen=seen, cache_dir=tmp_path, key="baseline")
    first = defenses.build("strip", _settings("strip", blends=3)).run(view())
    names = [p.name for p in tmp_path.iterdir()]
    assert names == ["strip-add-redrawn-blends3-seed0-reserve20-seed0.npz"]
    again = defenses.build("strip", _settings("strip", blends=3, threshold="empirical")).run(view())
    assert len(seen) == 6  # read back, not blended again
    assert np.allclose(first.report["cut_off_entropy"] - first.score_N, again.report["cut_off_entropy"] - again.score_N)


def test_strip_cut_off_rules_on_hand_built_entropies():
    clean_H = np.arange(20, dtype=np.float64)  # 0 .. 19
    assert strip.cut_off(clean_H, "empirical", 0.1) == 2.0  # sorted[floor(0.1 x 20)]
    assert strip.cut_off(clean_H, "empirical", 0.01) == 0.0
    # [1, 3]: the normal fit is mean 2, sd 1 (maximum likelihood)
    assert strip.cut_off(np.array([1.0, 3.0]), "normal", 0.01) == pytest.approx(2 - 2.3263478740)
    assert strip.cut_off(np.array([1.0, 3.0]), "normal", 0.1) == pytest.approx(2 - 1.2815515655)
    assert strip.cut_off(np.full(5, 0.7), "normal", 0.01) == 0.7  # no normal fits: the empirical one
    paper, toolbox = (config.preset("default", {**variants.get(n).fields, "eval.reserve": 100}).defense.strip
                      for n in ("strip/paper", "strip/toolbox"))
    assert (paper.threshold, paper.frr, paper.blends) == ("normal", 0.01, 100)
    assert (toolbox.threshold, toolbox.frr, toolbox.blends) == ("empirical", 0.1, 100)


def test_strip_removes_what_lies_below_the_cut_off():
    seen = []
    view = _strip_view(n=30, m=20, seen=seen)
    res = defenses.build("strip", _settings("strip", blends=2, threshold="empirical", frr=0.1)).run(view)
    train_H = res.report["cut_off_entropy"] - res.score_N
    assert np.array_equal(~res.is_clean_N, train_H < res.report["cut_off_entropy"])


# -- SCAn -------------------------------------------------------------------------------------------
def test_scan_anomaly_index_on_hand_built_statistics():
    # median 0; |J - median| = 1, 1, 0 x 5, 1, 1, x: their median 0.5, so 1.4826 MAD = 0.7413
    js = np.array([-1, -1, 0, 0, 0, 0, 0, 1, 1, 5 * 0.7413])
    j_star = scan.anomaly_index(js)
    assert j_star[9] == pytest.approx(5.0) and j_star[7] == pytest.approx(1 / 0.7413)
    assert (j_star[:7] == 0).all()  # one-sided
    assert (scan.anomaly_index(np.zeros(5)) == 0).all()


def test_scan_flags_a_class_at_j_star_5_under_e_but_not_under_e2(monkeypatch):
    rng = np.random.default_rng(0)
    k, n = 10, 30
    means = rng.normal(0, 6, (k, 4))
    y, ry = np.repeat(np.arange(k), n).astype(np.int32), np.repeat(np.arange(k), 10).astype(np.int32)
    feats, rf = means[y] + rng.normal(0, 1, (len(y), 4)), means[ry] + rng.normal(0, 1, (len(ry), 4))
    js = [-1, -1, 0, 0, 0, 0, 0, 1, 1, 5 * 0.7413]
    reserve = Reserve(np.zeros((len(ry), 1, 1, 1), np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    flagged = {}
    for name in ("scan/e", "scan/e2"):
        calls = iter(js)
        monkeypatch.setattr(scan, "statistic", lambda *a: next(calls))
        s = _settings("scan", threshold=variants.get(name).fields["defense.scan.threshold"])
        res = defenses.build("scan", s).run(_view(feats, y, reserve=reserve))
        flagged[name] = [c["label"] for c in res.report["classes"] if c["flagged"]]
        assert res.report["classes"][9]["J_star"] == pytest.approx(5.0)
    assert flagged == {"scan/e": [9], "scan/e2": []}


# -- every variant ----------------------------------------------------------------------------------
def test_every_variant_validates_against_the_config():
    for v in variants.VARIANTS.values():
        if v.fields["defense.name"] == "ibd_psc":
            continue  # it scales a real model's BatchNorm layers: tests/defenses/test_ibd_psc.py
        cfg = config.preset("default", {**v.fields, "eval.reserve": 100})
        for path, value in v.fields.items():
            got = settings.get(cfg, path)
            assert got == (tuple(value) if isinstance(value, list) else value), (v.name, path)
        assert v.name.split("/")[0] == cfg.defense.name and v.source and v.rule
        assert v.oracle == bool(v.knows.startswith("the true")), v.name
        assert defenses.build(cfg.defense.name, cfg.defense_settings()).oracle() == v.oracle, v.name


def test_detect_poison_refuses_an_oracle_mode_without_the_truth_before_any_work():
    def untouchable(*a, **k):
        raise AssertionError("the model ran")
    cfg = config.preset("default", variants.get("ss/every_class").fields)
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int32)
    with pytest.raises(UserError, match="true poison count"):
        defenses.detect_poison(types.SimpleNamespace(predict=untouchable), x, y, 10, cfg)


def _any_predict(x, transform=None, desc=None, logits=False):
    x = np.asarray(transform(x) if transform is not None else x)
    flat = x.reshape(len(x), -1)
    pred = (flat[:, 0] > 0.5).astype(np.int32)
    out = np.sin(flat[:, :3] * 5.0)
    return (pred, flat[:, :2], out) if logits else (pred, flat[:, :2])


def test_the_oracle_key_is_in_the_report_of_exactly_the_oracle_variants(tmp_path):
    feats, y = _spectre_features(sizes=(30, 30, 40), poisons=6, d=2)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (len(y), 4, 4, 1)).astype(np.float32)
    ry = np.repeat(np.arange(3), 20).astype(np.int32)
    rf = rng.normal(0, 1, (len(ry), 2)).astype(np.float32)
    reserve = Reserve(rng.uniform(0, 1, (len(ry), 4, 4, 1)).astype(np.float32), ry, rf, ry.copy(), np.arange(len(ry)))
    # cache_dir: CI's two variants fit the same mixtures once
    view = _view(feats, y, Truth(6, 2), reserve=reserve, predict=_any_predict, x=x, cache_dir=tmp_path, key="b")
    view.pred_N = _any_predict(x)[0]
    for v in variants.VARIANTS.values():
        if v.fields["defense.name"] == "ibd_psc":
            continue  # it scales a real model's BatchNorm layers: tests/defenses/test_ibd_psc.py
        cfg = config.preset("default", {**v.fields, "eval.reserve": 100})
        res = defenses.build(cfg.defense.name, cfg.defense_settings()).run(view)
        assert ("oracle" in res.report) == v.oracle, v.name
        if v.oracle:
            assert isinstance(res.report["oracle"], str) and "\n" not in res.report["oracle"]
            assert "poison count, 6" in res.report["oracle"] or "target class, 2" in res.report["oracle"]


def test_a_run_gives_the_defenses_the_attacks_truth():
    p = lambda n: types.SimpleNamespace(poisoned=types.SimpleNamespace(n_poison=n),
                                        cfg=types.SimpleNamespace(attack=types.SimpleNamespace(target=7)))
    assert experiment.truth(p(1000)) == Truth(1000, 7)
    assert experiment.truth(p(0)) == Truth(0, None)


def test_the_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert "## How the baselines are configured" in readme
    assert variants.markdown_table() in readme
    for name in variants.NAMES:
        assert f"| `{name}` |" in readme
    assert math.isclose(variants.get("scan/e2").fields["defense.scan.threshold"], math.exp(2))


# -- the STRIP scripts' pure parts ------------------------------------------------------------------
def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strip_n_check_subsample_and_operating_points():
    check = _script("strip_n_check")
    is_poison = np.zeros(100, bool)
    is_poison[[3, 50, 70, 90]] = True
    idx = check.subsample(is_poison, 2, 10, seed=0)
    assert np.array_equal(idx, check.subsample(is_poison, 2, 10, seed=0)) and (np.diff(idx) > 0).all()
    assert is_poison[idx].sum() == 2 and (~is_poison[idx]).sum() == 10
    assert check.subsample(is_poison, 9, 1000, seed=0).tolist() == list(range(100))
    # poisons 0.9, 0.8, 0.3; clean 0.85, 0.5, 0.2, 0.1: (FPR, TPR) = (0, 1/3), (1/4, 2/3), (1/2, 1), ...
    truth = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    score = np.array([0.9, 0.8, 0.3, 0.85, 0.5, 0.2, 0.1])
    assert metrics.tpr_at_fpr(truth, score, 0.0) == pytest.approx(1 / 3)
    assert metrics.tpr_at_fpr(truth, score, 0.25) == pytest.approx(2 / 3)
    assert metrics.tpr_at_fpr(truth, score, 0.5) == 1.0
    assert metrics.tpr_at_fpr(np.ones(3, bool), score[:3], 0.1) is None
    at = check.scores_at(truth, -score)  # lower entropy is more suspicious
    assert at["auc"] == pytest.approx(9 / 12) and at["tpr_at_1pct_fpr"] == pytest.approx(1 / 3)
    diff = check.differences({"auc": 0.9, "tpr_at_1pct_fpr": None}, {"auc": 0.88, "tpr_at_1pct_fpr": 0.5})
    assert diff["auc"] == pytest.approx(-2.0) and diff["tpr_at_1pct_fpr"] is None


def test_bench_strip_cost_of_a_cell():
    bench = _script("bench_strip")
    cost = bench.cell_cost(rate=6100.0, blends=100, reserve=1000)
    assert cost["blended_images"] == 6_100_000 and cost["seconds"] == pytest.approx(1000.0)
