"""The decision: from a frame's scores to ok/ng and the regions of a defect.

Two thresholds, both set at calibration (calibration/calibrate.py) and kept in the bundle:

- the image threshold decides, for every method alike: a part is NG exactly when its image
  score is at or above it;
- the pixel threshold, from the good pixel-score distribution (a high quantile of the score
  maps of held-out good images), cuts the score map into defect regions and is the mid-scale
  of heatmap colours.

An NG part always has a region: where its map nowhere reaches the pixel threshold (a method's
own image score decided, or the mask weighed the map down), the regions are cut at the map's
peak instead, so the strongest place is reported.

The normalised score maps a raw image score so that the median good score is 0 and the image
threshold exactly 1.0: ``normalized_score >= 1.0`` is NG, whatever the method's scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import cv2
import numpy as np
from pydantic import AfterValidator, Field, model_validator

from engines.settings import SettingError, Settings

__all__ = ["MAX_REGIONS", "Decision", "Judgement", "Region", "find_regions", "judge"]

MAX_REGIONS = 32  # a verdict lists at most this many regions, strongest first


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]


class Decision(Settings):
    """The decision's calibrated values, as the bundle keeps them."""

    image_threshold: Finite = Field(description="image score at or above which a part is NG")
    pixel_threshold: Finite = Field(description="score-map value that cuts regions and is the heatmap's mid-scale")
    center: Finite = Field(description="median image score of the held-out good images (normalised to 0)")
    policy: str = Field(description="how the image threshold was chosen (calibration/thresholds.py)")
    false_reject_rate: Finite = Field(ge=0.0, le=1.0, description="share of held-out good images at or above it")
    miss_rate: Finite | None = Field(None, ge=0.0, le=1.0, description="share of defect images below it; null: "
                                                                        "no defects were scored")
    pixel_quantile: Finite = Field(gt=0.0, le=1.0, description="quantile of good pixel scores the pixel "
                                                               "threshold is")

    @model_validator(mode="after")
    def _ordered(self) -> "Decision":
        if not self.image_threshold > self.center:
            raise SettingError("image_threshold", f"expected above center ({self.center}), the median good score, "
                                                  f"got {self.image_threshold}")
        return self


@dataclass
class Region:
    """A connected component of the score map above the cut (frame pixels)."""

    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float


@dataclass
class Judgement:
    status: Literal["ok", "ng"]
    image_score: float
    normalized_score: float
    regions: list[Region]


def judge(score_map: np.ndarray, image_score: float, frame_hw: tuple[int, int], decision: Decision) -> Judgement:
    """ok or ng by the image threshold; the regions of an NG part, in frame pixels."""
    ng = image_score >= decision.image_threshold
    regions = []
    if ng:
        cut = min(decision.pixel_threshold, float(score_map.max()))
        regions = find_regions(score_map, cut, frame_hw)
    normalized = (image_score - decision.center) / (decision.image_threshold - decision.center)
    return Judgement("ng" if ng else "ok", float(image_score), float(normalized), regions)


def find_regions(score_map: np.ndarray, cut: float, frame_hw: tuple[int, int] | None = None) -> list[Region]:
    """Connected components of ``score_map >= cut``, strongest first, in frame pixels: a map smaller
    than the frame (``frame_hw``) has its boxes and areas scaled up to it."""
    above = (score_map >= cut).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    mh, mw = score_map.shape
    fh, fw = frame_hw or (mh, mw)
    sy, sx = fh / mh, fw / mw
    regions = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        peak = float(score_map[y:y + h, x:x + w][labels[y:y + h, x:x + w] == i].max())
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = min(fw, int(np.ceil((x + w) * sx))), min(fh, int(np.ceil((y + h) * sy)))
        regions.append(Region(x=x0, y=y0, w=x1 - x0, h=y1 - y0, area=int(round(area * sx * sy)), peak=peak))
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions[:MAX_REGIONS]

