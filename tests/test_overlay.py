"""Overlays and heatmaps people can read: bounded size, the decision's colour scale, region boxes, the banner."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent import overlay
from agent.verdict import Inspection, ModelInfo, Region, Verdict

MODEL = ModelInfo("bracket", "2025-01-01T00:00:00Z", "padim")
MAGENTA = np.array([255, 0, 255])


def inspection(status: str = "ng", frame_hw: tuple[int, int] = (400, 600), grey: bool = False) -> Inspection:
    """A plain grey part, a map of half the pixel threshold with one hot square, the square as a region."""
    h, w = frame_hw
    frame = np.full((h, w) if grey else (h, w, 3), 128, np.uint8)
    score_map = np.full((h // 2, w // 2), 2.0, np.float32)  # a map smaller than the frame, as for large frames
    score_map[50:75, 100:150] = 9.0
    regions = [Region(x=200, y=100, w=100, h=50, area=5000, peak=9.0)] if status == "ng" else []
    verdict = Verdict(frame_id="f1", seq=1, source="cam", timestamp=0.0, status=status, model=MODEL,
                      image_score=9.0, threshold=5.0, normalized_score=1.84, pixel_threshold=4.0, regions=regions)
    return Inspection(verdict, frame, score_map)


def test_the_overlay_is_bounded_and_keeps_the_frames_aspect() -> None:
    image = overlay.render(inspection(frame_hw=(400, 600)), "overlay", max_side=300)
    assert image is not None and image.shape == (200, 300, 3) and image.dtype == np.uint8
    small = overlay.render(inspection(frame_hw=(100, 150)), "overlay", max_side=300)
    assert small is not None and small.shape == (100, 150, 3)  # never scaled up


def test_the_overlay_shows_the_part_boxes_the_region_and_colours_only_the_hot_place() -> None:
    image = overlay.render(inspection(), "overlay", max_side=600)
    assert image is not None
    # Well below the pixel threshold the part shows as it is: no tint.
    assert np.array_equal(image[300, 500], [128, 128, 128])
    # The hot square (map 2.25 x the threshold: JET's top, dark red) is coloured.
    b, g, r = image[125, 250].astype(int)
    assert r > b + 60 and r > g + 60
    # The region's box (frame pixels 200..300 x 100..150) is drawn in magenta, at its edges.
    assert np.array_equal(image[125, 200], MAGENTA) and np.array_equal(image[100, 250], MAGENTA)
    # The banner top left: the status colour under white text.
    assert tuple(image[1, 1]) == (40, 40, 230)


def test_ok_and_grey_frames_have_a_green_banner_and_no_box() -> None:
    image = overlay.render(inspection("ok", grey=True), "overlay", max_side=600)
    assert image is not None and image.shape == (400, 600, 3)
    assert tuple(image[1, 1]) == (60, 170, 60)
    assert not (image == MAGENTA).all(axis=2).any()


def test_the_heatmaps_mid_scale_is_the_pixel_threshold() -> None:
    insp = inspection()
    insp.score_map[:] = insp.verdict.pixel_threshold  # everything exactly at the threshold
    image = overlay.render(insp, "heatmap", max_side=1000)
    assert image is not None and image.shape == (200, 300, 3)  # the map's own size
    middle = cv2.applyColorMap(np.array([[127]], np.uint8), cv2.COLORMAP_JET)[0, 0]
    assert np.abs(image[10, 10].astype(int) - middle.astype(int)).max() <= 3


def test_nothing_to_show_without_a_map_or_a_frame() -> None:
    error = Verdict(frame_id="f2", seq=2, source="cam", timestamp=0.0, status="error", model=MODEL, error="x")
    assert overlay.render(Inspection(error), "overlay", 100) is None
    assert overlay.render(Inspection(error), "heatmap", 100) is None
    no_frame = inspection()
    no_frame.image = None
    assert overlay.render(no_frame, "overlay", 100) is None
    assert overlay.render(no_frame, "heatmap", 100) is not None


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff")])
def test_encode(fmt: str, magic: bytes) -> None:
    image = overlay.render(inspection(), "overlay", max_side=200)
    data = overlay.encode(image, fmt)
    assert data.startswith(magic)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == image.shape
