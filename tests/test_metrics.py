import json

import numpy as np
import pytest

from ci_jax import metrics

# 10 samples, poisons at 0, 1, 2; the defense removes poisons 0, 1 and clean sample 5.
IS_POISON_N = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
REMOVED_N = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)


def test_detection_hand_computed():
    score_N = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.85, 0.0, 0.05, 0.15, 0.25])
    out = metrics.detection(IS_POISON_N, REMOVED_N, score_N)

    assert out["removed"] == 3
    assert out["tpr"] == pytest.approx(2 / 3)
    assert out["fpr"] == pytest.approx(1 / 7)
    assert out["precision"] == pytest.approx(2 / 3)
    # Poison scores 0.9, 0.8, 0.1 against 7 clean: 7 + 6 + 2 = 15 of 21 pairs ranked right.
    assert out["auc"] == pytest.approx(15 / 21)
    # The counts behind the ratios.
    assert (out["removed_poisons"], out["poisons"], out["removed_clean"], out["clean_images"]) == (2, 3, 1, 7)
    assert set(out["denominators"]) == {"tpr", "fpr", "precision"}
    assert "covers" not in out and "removed_per_class" not in out


def test_detection_counts_covers_and_removals_per_class():
    # Samples 3 and 5 are covers (triggered, true label kept): they count as clean for the FPR.
    is_cover_N = np.zeros(10, bool)
    is_cover_N[[3, 5]] = True
    y_N = np.array([2, 2, 2, 0, 0, 1, 1, 1, 0, 0])
    out = metrics.detection(IS_POISON_N, REMOVED_N, np.zeros(10), is_cover_N=is_cover_N, y_N=y_N)
    assert out["covers"] == 2 and out["removed_covers"] == 1
    assert out["fpr"] == pytest.approx(1 / 7)
    assert out["removed_per_class"] == {"0": 0, "1": 1, "2": 2}
    json.dumps(out)


def test_detection_perfect_score_has_auc_one():
    score_N = IS_POISON_N.astype(np.float32) + np.linspace(0, 0.5, 10)
    assert metrics.detection(IS_POISON_N, IS_POISON_N, score_N)["auc"] == 1.0


def test_detection_without_poisons():
    is_poison_N = np.zeros(10, bool)
    out = metrics.detection(is_poison_N, REMOVED_N, np.arange(10.0))
    assert out["auc"] is None
    assert out["tpr"] is None  # no poisons: TPR is undefined, not 0
    assert out["fpr"] == pytest.approx(3 / 10)
    assert out["precision"] == 0.0  # 3 removed, none of them poisons
    assert out["poisons"] == 0 and out["removed_poisons"] == 0


def test_detection_nothing_removed_and_all_poison():
    out = metrics.detection(np.ones(4, bool), np.zeros(4, bool), np.zeros(4))
    # No clean images: FPR undefined; nothing removed: precision undefined.
    assert {k: out[k] for k in ("removed", "tpr", "fpr", "precision", "auc")} == \
        {"removed": 0, "tpr": 0.0, "fpr": None, "precision": None, "auc": None}
    assert (out["removed_poisons"], out["poisons"], out["removed_clean"], out["clean_images"]) == (0, 4, 0, 0)


def test_detection_is_json_serialisable_plain_python():
    out = metrics.detection(IS_POISON_N, REMOVED_N, np.arange(10, dtype=np.float32))
    json.dumps(out)
    assert type(out["removed"]) is int
    for key in ("tpr", "fpr", "precision", "auc"):
        assert type(out[key]) is float
    for key in ("removed_poisons", "poisons", "removed_clean", "clean_images"):
        assert type(out[key]) is int


def test_detection_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        metrics.detection(IS_POISON_N, REMOVED_N[:5], np.zeros(10))


def test_accuracy_and_asr():
    pred_N = np.array([0, 1, 2, 3, 3])
    y_N = np.array([0, 1, 2, 2, 0])
    assert metrics.accuracy(pred_N, y_N) == pytest.approx(0.6)
    assert metrics.attack_success_rate(pred_N, target=3) == pytest.approx(0.4)
    assert metrics.attack_success_rate(np.array([], dtype=np.int32), target=3) is None  # no images
    assert metrics.accuracy(np.array([], dtype=np.int32), np.array([], dtype=np.int32)) == 0.0
    assert type(metrics.accuracy(pred_N, y_N)) is float
    assert type(metrics.attack_success_rate(pred_N, 3)) is float
    json.dumps([metrics.accuracy(pred_N, y_N), metrics.attack_success_rate(pred_N, 3)])


def test_roc_curve_endpoints():
    fpr, tpr = metrics.roc_curve(IS_POISON_N, IS_POISON_N.astype(float))
    assert fpr[0] == 0.0 and tpr[0] == 0.0
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.any((fpr == 0.0) & (tpr == 1.0))  # a perfect score reaches the corner


def test_roc_auc_is_none_with_one_class_present():
    assert metrics.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.roc_auc(np.zeros(3, bool), np.arange(3.0)) is None
    assert metrics.roc_auc(np.ones(3, bool), np.arange(3.0)) is None
