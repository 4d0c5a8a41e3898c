"""The decision: ok/ng by the image threshold, regions cut at the pixel threshold, in frame pixels."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from engines.decision import Decision, find_regions, judge


def decision(image: float = 10.0, pixel: float = 6.0, center: float = 4.0) -> Decision:
    return Decision(image_threshold=image, pixel_threshold=pixel, center=center, policy="quantile",
                    false_reject_rate=0.0, pixel_quantile=0.999)


def test_ng_exactly_when_the_image_score_reaches_the_image_threshold() -> None:
    m = np.zeros((20, 20), np.float32)
    assert judge(m, 9.999, (20, 20), decision()).status == "ok"
    at = judge(m, 10.0, (20, 20), decision())
    assert at.status == "ng" and at.normalized_score == 1.0
    assert judge(m, 4.0, (20, 20), decision()).normalized_score == 0.0  # the median good score
    assert judge(m, 16.0, (20, 20), decision()).normalized_score == pytest.approx(2.0)  # unclipped


def test_regions_are_cut_at_the_pixel_threshold() -> None:
    m = np.zeros((20, 30), np.float32)
    m[2:5, 3:9] = 7.0     # above the pixel threshold 6
    m[12:15, 20:22] = 5.0  # below it
    j = judge(m, 12.0, (20, 30), decision())
    assert [(r.x, r.y, r.w, r.h, r.area, r.peak) for r in j.regions] == [(3, 2, 6, 3, 18, 7.0)]


def test_an_ng_part_always_has_a_region() -> None:
    # The head's own image score decided; the map nowhere reaches the pixel threshold.
    m = np.zeros((20, 20), np.float32)
    m[10:12, 5:8] = 2.0
    j = judge(m, 11.0, (20, 20), decision(pixel=6.0))
    assert j.status == "ng" and len(j.regions) == 1 and j.regions[0].peak == 2.0
    assert judge(m, 3.0, (20, 20), decision()).regions == []


def test_a_map_smaller_than_the_frame_gives_boxes_in_frame_pixels() -> None:
    m = np.zeros((100, 150), np.float32)
    m[10:20, 30:45] = 9.0
    (r,) = find_regions(m, 6.0, (1000, 1500))
    assert (r.x, r.y, r.w, r.h, r.area) == (300, 100, 150, 100, 15000)


def test_the_image_threshold_must_lie_above_the_median_good_score() -> None:
    with pytest.raises(ValidationError, match="image_threshold"):
        decision(image=4.0, center=4.0)
