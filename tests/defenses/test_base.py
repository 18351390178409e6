"""What every defense shares (ci_jax.defenses and its base): the registry, the View a defense reads,
detect_poison's one call, and planted clusters found by the feature-space defenses."""

import numpy as np
import pytest

from ci_jax import config, defenses, metrics
from ci_jax.defenses import ac
from ci_jax.errors import UserError

from helpers import D, clean_features, make_cfg, planted_features, run_defense, train_cfg, trainer

PER_CLASS = 400  # clean_features' images per class


def _cfg(name, **overrides):
    return make_cfg({"defense.name": name, **overrides}, preset="default")


@pytest.mark.parametrize("name,overrides", [("ac", {}), ("ac", {"defense.ac.reduce": "ica"}),
                                            ("ac", {"defense.ac.rule": "silhouette"}), ("ss", {})])
def test_planted_cluster_is_found(name, overrides):
    feats_ND, y_N, is_poison_N = planted_features()
    res = run_defense(name, feats_ND, y_N, is_poison_N, **overrides)
    det = metrics.detection(is_poison_N, ~res.is_clean_N, res.score_N)
    assert det["tpr"] == 1.0 and det["auc"] > 0.99
    assert res.score_N.shape == res.is_clean_N.shape == y_N.shape
    assert res.is_clean_N.dtype == bool
    assert [c["label"] for c in res.report["classes"]] == [0, 1, 2]
    assert res.timings_s and all(t >= 0 for t in res.timings_s.values())


def test_degenerate_classes_do_not_crash():
    feats_ND = np.ones((5, D), np.float32)
    y_N = np.array([0, 0, 0, 1, 2])
    for name in ("ac", "ss"):
        res = run_defense(name, feats_ND, y_N)
        assert res.score_N.shape == (5,) and np.isfinite(res.score_N).all()
    labels_N, sil = ac.split(np.ones((4, D)), config.Config().defense.ac, 0)
    assert sil is None and not labels_N.any()


def test_only_ci_asks_for_the_filtered_pass():
    feats_ND, y_N = clean_features()
    calls = []

    def filtered(desc):
        calls.append(desc)
        return y_N

    for name in ("ac", "ss", "ci"):
        run_defense(name, feats_ND, y_N, filtered=filtered, **{"defense.ci.covariance": "diag"})
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
    feats_ND, y_N, is_poison_N = planted_features()
    x_NHWC = np.zeros((len(y_N), 28, 28, 1), np.float32)
    report, is_clean_N = defenses.detect_poison(_FitTrainer(feats_ND, y_N), x_NHWC, y_N, 3, _cfg("ss"))
    assert is_clean_N.shape == y_N.shape and not is_clean_N[is_poison_N].any()
    assert "poisons" not in report["classes"][0]  # no ground truth
    with pytest.raises(UserError, match="gaussian_sigma"):  # the defense's settings are checked first
        defenses.detect_poison(_FitTrainer(feats_ND, y_N), x_NHWC, y_N, 3,
                               _cfg("ci", **{"defense.ci.filters": ["gaussian"], "defense.ci.gaussian_sigma": 20.0}))


# -- ART's shape ------------------------------------------------------------------------------------
def test_detect_poison_is_one_call_with_arts_shape(synthetic_data):
    ds = synthetic_data(600, 100)
    cfg = train_cfg({"defense.name": "ss"})
    t = trainer(cfg, ds)  # untrained: the call's shape is what counts
    report, is_clean = defenses.detect_poison(t, ds.x_train, ds.y_train, ds.num_classes, cfg)
    assert is_clean.shape == (600,) and is_clean.dtype == bool
    assert (~is_clean).sum() == sum(c["removed"] for c in report["classes"])
    assert {c["label"] for c in report["classes"]} == set(range(10))
