"""Ranking metrics on scores and binary labels: AUROC and average precision, with the counts they
are read from. Items are ranked by descending score and read at the end of each run of tied scores,
so a threshold ``t`` means "anomalous where score >= t"; the definitions are scikit-learn's
(trapezoidal ROC, step-wise AP without interpolation).

Here, below calibration, because both calibration's evaluation (calibration/metrics.py) and the
trained methods' stopping criterion (engines/validation.py) read them.
"""
from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "roc_auc"]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve; None when one class is absent."""
    _, tps, fps = _ranked_counts(scores, labels)
    return _roc_auc(tps, fps)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision (sum of precision times recall increments); None without positives."""
    _, tps, fps = _ranked_counts(scores, labels)
    return _average_precision(tps, fps)


def _ranked_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, positives at or above, negatives at or above), one per distinct score."""
    scores, labels = _check_labels(scores, labels)
    order = _descending_order(scores)
    ranked = scores[order]
    ends = _run_ends(ranked)
    tps, fps = _counts(ends, labels[order])
    return ranked[ends], tps, fps


def _roc_points(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([[0.0], fps / fps[-1]]), np.concatenate([[0.0], tps / tps[-1]])


def _roc_auc(tps: np.ndarray, fps: np.ndarray) -> float | None:
    if tps[-1] == 0 or fps[-1] == 0:
        return None
    fpr, tpr = _roc_points(tps, fps)
    return float(np.trapezoid(tpr, fpr))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float | None:
    if tps[-1] == 0:
        return None
    precision = tps / (tps + fps)
    recall_gain = np.diff(tps, prepend=0.0) / tps[-1]
    return float(np.sum(recall_gain * precision))


def _run_ends(ranked_scores: np.ndarray) -> np.ndarray:
    """Last index of each run of tied scores: a threshold admits a whole run or none of it."""
    return np.append(np.flatnonzero(np.diff(ranked_scores)), ranked_scores.size - 1)


def _counts(run_ends: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Integer running counts are exact and several times faster than float ones.
    tps = np.cumsum(positive, dtype=np.int64)[run_ends]
    return tps.astype(np.float64), (run_ends + 1 - tps).astype(np.float64)


def _descending_order(values: np.ndarray) -> np.ndarray:
    """Indices that sort float32 `values` descending.

    numpy's argsort is several times slower than its SIMD sort on tens of millions of
    pixels, so the float bits are made order-preserving unsigned ints, packed above the
    index into one uint64 and sorted directly.
    """
    if values.dtype != np.float32 or values.size >= 2**32:
        return np.argsort(values, kind="stable")[::-1]
    bits = values.view(np.uint32)
    # Negative floats order reversed by their bits: flip them all; positives: set the sign bit.
    ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    keys = (ordered.astype(np.uint64) << np.uint64(32)) | np.arange(values.size, dtype=np.uint64)
    keys.sort()
    return (keys[::-1] & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _check_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}"
        )
    if scores.size == 0:
        raise ValueError("scores are empty")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (good) or 1 (anomalous), got {np.unique(labels)}")
    return scores, labels.astype(bool)
