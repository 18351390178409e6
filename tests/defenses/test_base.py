"""The defenses on synthetic features: a planted cluster is found; clean features are not."""

import numpy as np
import pytest

from ci_jax import config, defenses, metrics
from ci_jax.defenses import ac, ss
from ci_jax.errors import UserError

D, PER_CLASS, N_PLANT, TARGET = 16, 400, 60, 2


def _clean(seed=0, num_classes=3):
    rng = np.random.default_rng(seed)
    means_KD = rng.normal(0, 6, (num_classes, D))
    y_N = np.repeat(np.arange(num_classes), PER_CLASS)
    feats_ND = means_KD[y_N] + rng.normal(0, 1, (len(y_N), D))
    return feats_ND.astype(np.float32), y_N


def _planted(seed=0):
    """Class TARGET gets N_PLANT extra points far from its own blob: the 'poisons'."""
    feats_ND, y_N = _clean(seed)
    rng = np.random.default_rng(seed + 1)
    plant_MD = rng.normal(0, 6, D) + rng.normal(0, 1, (N_PLANT, D))
    feats_ND = np.concatenate([feats_ND, plant_MD.astype(np.float32)])
    y_N = np.concatenate([y_N, np.full(N_PLANT, TARGET)])
    is_poison_N = np.arange(len(y_N)) >= len(y_N) - N_PLANT
    return feats_ND, y_N, is_poison_N


def _cfg(name, **overrides):
    return config.replace(config.Config(), {"defense.name": name, **overrides})


def _view(feats_ND, y_N, is_poison_N=None, filtered=None):
    """A baseline that fits its training set (its decisions are the labels) and whose filtered
    decisions are `filtered(desc)` (default: unchanged); CI then measures the filter only."""
    def predict(x_NHWC, transform=None, desc=None):
        assert transform is not None  # extra passes are filtered ones
        out = y_N if filtered is None else filtered(desc)
        return np.asarray(out, np.int32), feats_ND

    return defenses.View(x_NHWC=np.zeros((len(y_N), 1, 1, 1), np.float32), y_N=y_N, feats_ND=feats_ND,
                         pred_N=y_N.copy(), num_classes=3, predict=predict, seed=0, is_poison_N=is_poison_N)


def _run(name, feats_ND, y_N, is_poison_N=None, filtered=None, **overrides):
    cfg = _cfg(name, **overrides)
    return defenses.build(name, cfg.defense_settings()).run(_view(feats_ND, y_N, is_poison_N, filtered))


@pytest.mark.parametrize("name,overrides", [("ac", {}), ("ac", {"defense.ac.reduce": "ica"}),
                                            ("ac", {"defense.ac.rule": "silhouette"}), ("ss", {})])
def test_planted_cluster_is_found(name, overrides):
    feats_ND, y_N, is_poison_N = _planted()
    res = _run(name, feats_ND, y_N, is_poison_N, **overrides)
    det = metrics.detection(is_poison_N, ~res.is_clean_N, res.score_N)
    assert det["tpr"] == 1.0 and det["auc"] > 0.99
    assert res.score_N.shape == res.is_clean_N.shape == y_N.shape
    assert res.is_clean_N.dtype == bool
    assert [c["label"] for c in res.report["classes"]] == [0, 1, 2]
    assert res.timings_s and all(t >= 0 for t in res.timings_s.values())


def test_ac_on_clean_features_keeps_everything():
    feats_ND, y_N = _clean()
    res = _run("ac", feats_ND, y_N)
    assert res.is_clean_N.all()
    for c in res.report["classes"]:  # 2-means halves a single blob: neither half is small
        assert not c["flagged"] and min(k["size"] for k in c["clusters"]) > 0.35 * PER_CLASS


def test_ac_report_counts_poisons_per_cluster():
    feats_ND, y_N, is_poison_N = _planted()
    target = next(c for c in _run("ac", feats_ND, y_N, is_poison_N).report["classes"] if c["label"] == TARGET)
    flagged = next(k for k in target["clusters"] if k["flagged"])
    assert flagged == {"size": N_PLANT, "flagged": True, "poisons": N_PLANT}
    assert target["silhouette"] > 0.5


def test_ss_removes_one_and_a_half_eps_of_every_class_even_when_clean():
    feats_ND, y_N = _clean()
    res = _run("ss", feats_ND, y_N, **{"defense.ss.eps": 0.1})
    for c in range(3):
        assert np.count_nonzero(~res.is_clean_N[y_N == c]) == int(1.5 * 0.1 * PER_CLASS)
    # Scores are scaled by each class's cut-off: removed iff score >= 1.
    np.testing.assert_array_equal(~res.is_clean_N, res.score_N >= 1.0)


def test_ss_projects_centred_features():
    rng = np.random.default_rng(0)
    # Far from the origin, the uncentred top direction is the mean; the spread is along axis 1.
    feats_ND = np.array([100.0, 0.0]) + rng.normal(0, 1, (500, 2)) * np.array([0.1, 3.0])
    s_N = ss.scores(feats_ND)
    centred_ND = feats_ND - feats_ND.mean(0)
    np.testing.assert_allclose(s_N, centred_ND[:, 1] ** 2, rtol=0.05, atol=0.05)


def test_degenerate_classes_do_not_crash():
    feats_ND = np.ones((5, D), np.float32)
    y_N = np.array([0, 0, 0, 1, 2])
    for name in ("ac", "ss"):
        res = _run(name, feats_ND, y_N)
        assert res.score_N.shape == (5,) and np.isfinite(res.score_N).all()
    labels_N, sil = ac.split(np.ones((4, D)), config.Config().defense.ac, 0)
    assert sil is None and not labels_N.any()


def test_ss_report_counts_removed_poisons_per_class():
    feats_ND, y_N, is_poison_N = _planted()
    res = _run("ss", feats_ND, y_N, is_poison_N)
    target = next(c for c in res.report["classes"] if c["label"] == TARGET)
    assert target == {"label": TARGET, "size": PER_CLASS + N_PLANT, "removed": int(1.5 * 0.1 * (PER_CLASS + N_PLANT)),
                      "poisons": N_PLANT, "removed_poisons": N_PLANT}


def test_ci_flags_nothing_on_clean_features():
    feats_ND, y_N = _clean()
    res = _run("ci", feats_ND, y_N, **{"defense.ci.covariance": "diag"})
    assert res.is_clean_N.all() and all(c["k"] == 1 for c in res.report["classes"])


def test_only_ci_asks_for_the_filtered_pass():
    feats_ND, y_N = _clean()
    calls = []

    def filtered(desc):
        calls.append(desc)
        return y_N

    for name in ("ac", "ss", "ci"):
        _run(name, feats_ND, y_N, filtered=filtered, **{"defense.ci.covariance": "diag"})
    assert calls == ["median3"]


def test_build_names_the_defenses_and_refuses_others():
    cfg = config.Config()
    for name in ("ci", "ac", "ss"):
        assert type(defenses.build(name, getattr(cfg.defense, name))) is defenses.REGISTRY[name]
    with pytest.raises(UserError, match="unknown defense 'sticker'"):
        defenses.build("sticker", None)


class _FitTrainer:
    """A trained model's stand-in: its decisions are the labels, its features given."""

    def __init__(self, feats_ND, y_N):
        self.feats_ND, self.y_N = feats_ND, y_N

    def predict(self, x_NHWC, transform=None, desc=None, logits=False):
        return self.y_N.copy(), self.feats_ND


def test_detect_poison_gives_the_report_and_the_mask_of_what_it_keeps():
    feats_ND, y_N, is_poison_N = _planted()
    x_NHWC = np.zeros((len(y_N), 28, 28, 1), np.float32)
    report, is_clean_N = defenses.detect_poison(_FitTrainer(feats_ND, y_N), x_NHWC, y_N, 3, _cfg("ss"))
    assert is_clean_N.shape == y_N.shape and not is_clean_N[is_poison_N].any()
    assert "poisons" not in report["classes"][0]  # no ground truth
    with pytest.raises(UserError, match="gaussian_sigma"):  # the defense's settings are checked first
        defenses.detect_poison(_FitTrainer(feats_ND, y_N), x_NHWC, y_N, 3,
                               _cfg("ci", **{"defense.ci.filters": ["gaussian"], "defense.ci.gaussian_sigma": 20.0}))
