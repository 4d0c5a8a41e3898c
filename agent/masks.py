"""Object masks: restrict scoring to the part (static ROI polygons or feature matching).

SKELETON: the interface below is wired into calibration and the scorer; the
implementation is being written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np


@dataclass
class MaskConfig:
    kind: Literal["none", "roi", "features"] = "none"
    polygons: list[list[list[float]]] = field(default_factory=list)  # roi: [[x, y], ...] in frame pixels
    detector: Literal["akaze", "orb", "brisk"] = "orb"               # features: keypoint detector
    references: int = 3              # features: good images kept in the bundle as references
    min_matches: int = 12            # features: below this, no homography (fall back to matched region)
    outside_weight: float = 0.0      # score-map weight outside the object (0..1)


class ObjectMask:
    def weights(self, image: np.ndarray) -> np.ndarray:
        """Frame-size float32 weights in [0, 1] for the score map of ``image``."""
        raise NotImplementedError


def fit_mask(cfg: MaskConfig, good_paths: list[Path], bundle_dir: Path) -> dict[str, Any]:
    """Write what the mask needs into ``bundle_dir`` (e.g. mask/); return the manifest section."""
    raise NotImplementedError


def load_mask(section: dict[str, Any], bundle_dir: Path) -> ObjectMask:
    raise NotImplementedError
