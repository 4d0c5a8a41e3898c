"""The decision: from a frame's scores to ok/ng and the regions of a defect.

Two thresholds, both set at calibration (calibration/calibrate.py) and kept in the bundle:

- the image threshold decides: a part is NG when its image score is at or above it;
- the pixel threshold (from the good pixel-score distribution) cuts the score map into defect
  regions and is the mid-scale of heatmap colours.

The normaliser maps a raw image score so that the median good score is 0 and the image
threshold exactly 1.0: ``normalized_score >= 1.0`` is NG, whatever the method's scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Normalizer"]


@dataclass
class Normalizer:
    """Maps a raw score so that `center` (the median good score) is 0 and `threshold` is 1.

    Unclipped: a normalised score >= 1.0 means NG, whatever the method's raw scale.
    """

    threshold: float
    center: float

    def __post_init__(self) -> None:
        if not self.threshold > self.center:
            raise ValueError(
                f"normalizer threshold {self.threshold} must be above its center {self.center} "
                "(the median good score)"
            )

    @classmethod
    def fit(cls, threshold: float, good_scores: np.ndarray) -> Normalizer:
        return cls(threshold=float(threshold), center=float(np.median(np.asarray(good_scores, np.float64).reshape(-1))))

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        normalized = (np.asarray(score, np.float64) - self.center) / (self.threshold - self.center)
        return float(normalized) if normalized.ndim == 0 else normalized

    def to_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, "center": self.center}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Normalizer:
        missing = [key for key in ("threshold", "center") if key not in record]
        if missing:
            raise ValueError(f"normalizer record is missing key(s) {missing}: {record!r}")
        return cls(threshold=float(record["threshold"]), center=float(record["center"]))


