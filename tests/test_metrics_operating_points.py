"""Matched operating points: TPR at FPR <= x from a suspicion score, in metrics.detection, the typed
report (and reports from before them), the sweep's row and the CLI's summary."""

import json

import numpy as np
import pytest

from ci_jax import cli, config, metrics, sweep
from ci_jax.report import DefenseReport, Detection, Report, Scores

# 5 poisons and 10 clean samples. Two poisons tie with a clean sample at 0.8, one with a clean one at 0.5.
POISON_SCORES = [0.9, 0.8, 0.8, 0.5, 0.2]
CLEAN_SCORES = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.15, 0.1, 0.0, -0.1]
IS_POISON_N = np.array([True] * 5 + [False] * 10)
SCORE_N = np.array(POISON_SCORES + CLEAN_SCORES)


@pytest.mark.parametrize("max_fpr, tpr", [
    # The ROC by hand, a threshold taking every sample of its score or more:
    #   >= 0.9: 1 poison, 0 clean (FPR 0, TPR 0.2); >= 0.8: 3 poisons, 1 clean (0.1, 0.6);
    #   >= 0.7: (0.2, 0.6); >= 0.6: (0.3, 0.6); >= 0.5: 4 poisons, 4 clean (0.4, 0.8); ...;
    #   >= 0.2: 5 poisons, 6 clean (0.6, 1.0).
    (0.0, 0.2),  # the tied 0.8s cannot be had without their clean twin: 0.2, not 0.6 (nor 0.4)
    (0.05, 0.2),
    (0.1, 0.6),
    (0.35, 0.6),
    (0.4, 0.8),
    (0.59, 0.8),
    (0.6, 1.0),
    (1.0, 1.0),
])
def test_tpr_at_fpr_against_a_hand_computed_roc_with_ties(max_fpr, tpr):
    assert metrics.tpr_at_fpr(IS_POISON_N, SCORE_N, max_fpr) == pytest.approx(tpr)


def test_tpr_at_fpr_is_undefined_with_one_class():
    assert metrics.tpr_at_fpr(np.zeros(4, bool), np.arange(4.0), 0.1) is None
    assert metrics.tpr_at_fpr(np.ones(4, bool), np.arange(4.0), 0.1) is None


def _thousand_clean():
    """1,000 clean samples scored 0.000, 0.001, ..., 0.999 and 10 poisons around the top."""
    poisons = [2.0, 2.0, 0.9995, 0.9985, 0.995, 0.985, 0.955, 0.5, 0.1, -1.0]
    score_N = np.concatenate([poisons, np.arange(1000) / 1000])
    is_poison_N = np.arange(1010) < 10
    return is_poison_N, score_N


def test_detection_reports_tpr_at_0_1_1_and_5_percent_fpr_beside_the_auc():
    is_poison_N, score_N = _thousand_clean()
    out = metrics.detection(is_poison_N, np.zeros(1010, bool), score_N)
    keys = list(out)
    assert keys[keys.index("auc") + 1] == "tpr_at_fpr"
    # FPR <= 0.1 %: at most 1 clean sample (0.999) -> the 4 poisons >= 0.9985.
    # FPR <= 1 %: at most 10 (0.990-0.999) -> 5 poisons >= 0.99; 0.985 would cost 15.
    # FPR <= 5 %: at most 50 (0.950-0.999) -> 7 poisons >= 0.955.
    assert out["tpr_at_fpr"] == {"0.001": pytest.approx(0.4), "0.01": pytest.approx(0.5), "0.05": pytest.approx(0.7)}
    assert out["tpr"] == 0.0 and out["removed"] == 0  # the rule's own result stays what it removed
    json.dumps(out)
    assert all(type(v) is float for v in out["tpr_at_fpr"].values())


def test_detection_without_poisons_has_no_operating_points():
    out = metrics.detection(np.zeros(5, bool), np.zeros(5, bool), np.arange(5.0))
    assert out["tpr_at_fpr"] == {"0.001": None, "0.01": None, "0.05": None}


def _report(detection: Detection) -> Report:
    return Report(config={}, data={}, attack={"asr_measured_on": "test images of class 0, triggered"},
                  baseline=Scores(0.99, 0.92, 0.001), defense=DefenseReport("ci", detection, {"gmm": 1.0}, {"k": 3}),
                  retrained=Scores(None, None, skipped=True), device={}, timings_s={"total": 10.0, "defense": 2.0})


def test_the_report_round_trips_the_operating_points():
    is_poison_N, score_N = _thousand_clean()
    detection = Detection(**metrics.detection(is_poison_N, score_N > 0.99, score_N))
    report = _report(detection)
    d = json.loads(json.dumps(report.to_json()))
    keys = list(d["defense"])
    assert keys[keys.index("auc") + 1] == "tpr_at_fpr"
    assert d["defense"]["tpr_at_fpr"] == {"0.001": 0.4, "0.01": 0.5, "0.05": 0.7}
    assert Report.from_json(d) == report


def test_a_report_from_before_the_operating_points_reads_back_without_them():
    old = {"name": "ci", "removed": 3, "tpr": 1.0, "fpr": 0.0, "precision": 1.0, "auc": 1.0, "removed_poisons": 3,
           "poisons": 3, "removed_clean": 0, "clean_images": 7, "denominators": {}, "timings_s": {}, "ci": {}}
    back = DefenseReport.from_json(old)
    assert back.detection.tpr_at_fpr is None
    assert "tpr_at_fpr" not in back.to_json()  # written back as it was
    # Its sweep row has the columns, empty; the CLI's summary leaves them out.
    run = sweep.Run("r1", config.preset("default"), {}, "r1")
    row = sweep.row_of(run, _report(back.detection))
    assert [row[c] for c in sweep.OPERATING_COLUMNS] == [None, None, None]
    assert row["untriggered_before"] == 0.001 and row["oracle"] == ""
    assert "TPR at FPR" not in cli.summary(_report(back.detection), "r/report.json")


def test_the_sweep_row_and_the_cli_summary_carry_the_operating_points():
    is_poison_N, score_N = _thousand_clean()
    report = _report(Detection(**metrics.detection(is_poison_N, score_N > 0.99, score_N)))
    row = sweep.row_of(sweep.Run("r1", config.preset("default"), {}, "r1"), report)
    assert sweep.OPERATING_COLUMNS == ("tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "tpr_at_fpr_0.05")
    assert [row[c] for c in sweep.OPERATING_COLUMNS] == pytest.approx([0.4, 0.5, 0.7])
    assert set(sweep.OPERATING_COLUMNS) <= set(sweep.METRICS)
    text = cli.summary(report, "r/report.json")
    # AUC by hand: of the 10 x 1,000 pairs the poisons win 2000 + 1000 + 999, then 995, 985, 955, 500
    # and 100, each with half a pair for its tied clean twin: 7536.5 / 10000.
    assert report.defense.detection.auc == pytest.approx(0.75365)
    assert "AUC 0.7536  TPR at FPR <= 0.1/1/5 %: 40.00 / 50.00 / 70.00 %" in text
    assert len(text.splitlines()) == 4
