"""Evaluation numbers for an attack and a defense, as plain Python values ready for JSON."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import sklearn.metrics

# The false-positive rates at which every defense's ranking is read (TPR at FPR <= x), beside its
# own rule's result and the AUC: one operating point per method mixes the threshold with the ranking.
OPERATING_POINTS: tuple[float, ...] = (0.001, 0.01, 0.05)
# A backdoor worth scoring: the baseline's ASR at least this, and the same test images untriggered
# taken for the target at most ASR / UNTRIGGERED_SHARE (else the "ASR" is mostly label noise).
VALID_ASR = 0.85
UNTRIGGERED_SHARE = 10
NO_ATTACK = "no attack: no backdoor to score (FPR only)"
# Rates are ratios of counts; a rate on a boundary (850 of 1000 = 0.85) must not fall off it by rounding.
_EPS = 1e-12


def fmt_rate(v: float | None) -> str:
    """A rate (accuracy, ASR, TPR, FPR, precision) as printed: percent with 2 decimals."""
    return "n/a" if v is None else f"{100 * v:.2f} %"


def fmt_auc(v: float | None) -> str:
    """An ROC AUC as printed: 4 decimals (it is not a rate of anything)."""
    return "n/a" if v is None else f"{v:.4f}"


def accuracy(pred_N: np.ndarray, y_N: np.ndarray) -> float:
    """Fraction of predictions equal to the labels; 0.0 for an empty set."""
    pred_N, y_N = _same_shape(pred_N, y_N)
    if pred_N.size == 0:
        return 0.0
    return float(np.mean(pred_N == y_N))


def attack_success_rate(pred_N: np.ndarray, target: int) -> float | None:
    """Fraction of predictions (on triggered images) equal to `target`; None for no images."""
    pred_N = np.asarray(pred_N).ravel()
    if pred_N.size == 0:
        return None
    return float(np.mean(pred_N == target))


def detection(is_poison_N: np.ndarray, removed_N: np.ndarray, score_N: np.ndarray, *,
              is_cover_N: np.ndarray | None = None, y_N: np.ndarray | None = None) -> dict:
    """How well a defense separated poisons from the rest, with the denominators it used.

    removed_N: bool, what the defense removed; score_N: higher = more suspicious.
    TPR is over the poisons; FPR over every other training image (the attack's covers included:
    they keep their true labels); precision over what was removed. A rate whose denominator is
    empty (TPR with no poisons, precision with nothing removed) is None, not a number, and so is
    auc when only one kind of image is present (ROC AUC is undefined there). tpr_at_fpr: the best
    TPR of the score at FPR <= x for each x of OPERATING_POINTS (keys str(x)), whatever the
    defense's own rule removed; None for each under the same condition as auc.
    is_cover_N: also count the covers removed; y_N: also count the removals per label.
    """
    is_poison_N, removed_N = _same_shape(is_poison_N, removed_N)
    is_poison_N, score_N = _same_shape(is_poison_N, score_N)
    is_poison_N = is_poison_N.astype(bool)
    removed_N = removed_N.astype(bool)

    n_poison = int(np.count_nonzero(is_poison_N))
    n_clean = int(is_poison_N.size - n_poison)
    n_removed = int(np.count_nonzero(removed_N))
    removed_poison = int(np.count_nonzero(removed_N & is_poison_N))
    removed_clean = n_removed - removed_poison
    out = {
        "removed": n_removed,
        "tpr": _ratio(removed_poison, n_poison),
        "fpr": _ratio(removed_clean, n_clean),
        "precision": _ratio(removed_poison, n_removed),
        "auc": roc_auc(is_poison_N, score_N),
        "tpr_at_fpr": {str(x): tpr_at_fpr(is_poison_N, score_N, x) for x in OPERATING_POINTS},
        "removed_poisons": removed_poison,
        "poisons": n_poison,
        "removed_clean": removed_clean,
        "clean_images": n_clean,
        "denominators": {"tpr": "poisons", "fpr": "training images that are not poisons (covers included)",
                         "precision": "removed images"},
    }
    if is_cover_N is not None:
        is_cover_N = np.asarray(is_cover_N, bool)
        out["covers"] = int(np.count_nonzero(is_cover_N))
        out["removed_covers"] = int(np.count_nonzero(removed_N & is_cover_N))
    if y_N is not None:
        y_N = np.asarray(y_N)
        out["removed_per_class"] = {str(int(c)): int(np.count_nonzero(removed_N & (y_N == c))) for c in np.unique(y_N)}
    return out


def roc_auc(is_poison_N: np.ndarray, score_N: np.ndarray) -> float | None:
    """ROC AUC of a suspicion score; None when only one class is present (undefined there)."""
    is_poison_N, score_N = _same_shape(is_poison_N, score_N)
    is_poison_N = is_poison_N.astype(bool)
    if is_poison_N.all() or not is_poison_N.any():
        return None
    return float(sklearn.metrics.roc_auc_score(is_poison_N, score_N.astype(np.float64)))


def tpr_at_fpr(is_poison_N: np.ndarray, score_N: np.ndarray, max_fpr: float) -> float | None:
    """The best TPR over the score's thresholds whose FPR is at most `max_fpr` (higher score = more
    suspicious). A threshold takes every sample of equal score (sklearn's ROC points), so tied
    clean samples count against it. None when only one class is present."""
    is_poison_N, score_N = _same_shape(is_poison_N, score_N)
    is_poison_N = is_poison_N.astype(bool)
    if is_poison_N.all() or not is_poison_N.any():
        return None
    fpr, tpr, _ = sklearn.metrics.roc_curve(is_poison_N, score_N.astype(np.float64), drop_intermediate=False)
    # FPR as counts, so that 1 of 1,000 clean images meets 0.1 % exactly.
    n_clean = int(np.count_nonzero(~is_poison_N))
    ok = np.rint(fpr * n_clean) <= max_fpr * n_clean * (1 + _EPS)
    return float(tpr[ok].max())  # the first point, (0, 0), always qualifies


class Validity(NamedTuple):
    """Whether an attack cell is a backdoor to score, and why not; status: valid, invalid, or no attack."""

    valid: bool
    reason: str

    @property
    def status(self) -> str:
        return "valid" if self.valid else "no attack" if self.reason == NO_ATTACK else "invalid"


def attack_cell_validity(asr: float | None, untriggered_rate: float | None) -> Validity:
    """An attack cell is scored as a backdoor only if the baseline's ASR is at least VALID_ASR and
    the same test images, untriggered, are taken for the target at most ASR / UNTRIGGERED_SHARE
    of the time (bpp on MNIST: ASR 37.7 % with 36.9 % untriggered is label noise, not a backdoor).
    asr None: no attack (no backdoor to score: FPR only). An ASR without the untriggered rate
    (a report from before it was measured) cannot be checked, and is not valid."""
    if asr is None or (isinstance(asr, float) and math.isnan(asr)):
        return Validity(False, NO_ATTACK)
    reasons = []
    if asr < VALID_ASR - _EPS:
        reasons.append(f"ASR {fmt_rate(asr)} < {100 * VALID_ASR:g} %")
    if untriggered_rate is None or math.isnan(untriggered_rate):
        reasons.append("untriggered target rate not measured")
    elif untriggered_rate > asr / UNTRIGGERED_SHARE + _EPS:
        reasons.append(f"untriggered rate {fmt_rate(untriggered_rate)} > ASR/{UNTRIGGERED_SHARE}")
    return Validity(not reasons, "; ".join(reasons))


def roc_curve(is_poison_N: np.ndarray, score_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) points of the ROC curve, for plots; needs both poisons and clean samples."""
    is_poison_N, score_N = _same_shape(is_poison_N, score_N)
    fpr, tpr, _ = sklearn.metrics.roc_curve(is_poison_N.astype(bool), score_N.astype(np.float64))
    return fpr, tpr


def _ratio(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def _same_shape(a_N: np.ndarray, b_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Mismatched arrays are a bug in the caller, not a user mistake, hence ValueError.
    a_N, b_N = np.asarray(a_N).ravel(), np.asarray(b_N).ravel()
    if a_N.shape != b_N.shape:
        raise ValueError(f"arrays differ in length: {a_N.shape[0]} vs {b_N.shape[0]}")
    return a_N, b_N
