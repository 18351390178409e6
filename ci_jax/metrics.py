"""Evaluation numbers for an attack and a defense, as plain Python values ready for JSON."""

from __future__ import annotations

import numpy as np
import sklearn.metrics


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
    auc when only one kind of image is present (ROC AUC is undefined there).
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
