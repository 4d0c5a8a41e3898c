"""Images a person can read, made from an inspection: the heatmap, and the overlay.

- ``heatmap``: the score map in JET colours. The colour scale is the decision's (engines/decision.py):
  mid-scale is the pixel threshold, so yellow to red is where the map is above the cut that makes
  regions, and blue is well below it.
- ``overlay``: the heatmap blended over the frame where the score nears or passes the pixel
  threshold (a good part stays clear), the regions' boxes (verdict.regions, frame pixels) in
  magenta (a colour JET never uses), and a banner with the status and the normalised score
  (1.00 is the image threshold).

Both are at most ``max_side`` pixels long. A frame that was not judged (an error verdict) has no
map, so no image.
"""
from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from agent.verdict import Inspection

__all__ = ["MAX_SIDE", "ImageFormat", "ImageKind", "bounded", "encode", "render"]

# Longest side of overlays and heatmaps unless configured (agent.image_max_side): enough to see a
# defect on an HMI, small enough to send every frame.
MAX_SIDE = 640

ImageKind = Literal["overlay", "heatmap"]
ImageFormat = Literal["png", "jpeg"]

_JPEG_QUALITY = 90
# Opacity of the heatmap over the frame, by score / pixel threshold: clear below _CLEAR_BELOW (good
# parts' maps lie mostly at 0.4-0.9 of the threshold), rising to _MAX_OPACITY at _OPAQUE_FROM.
_CLEAR_BELOW, _OPAQUE_FROM, _MAX_OPACITY = 0.75, 1.25, 0.65
_BGR = {"ng": (40, 40, 230), "ok": (60, 170, 60)}
_BOX = (255, 0, 255)


def render(inspection: Inspection, kind: ImageKind, max_side: int) -> np.ndarray | None:
    """The ``kind`` image of an inspection (BGR uint8, longest side at most ``max_side``), or None
    when there is nothing to show: no score map (an error verdict), or no frame for an overlay."""
    verdict, score_map = inspection.verdict, inspection.score_map
    if score_map is None or verdict.pixel_threshold is None:
        return None
    if kind == "heatmap":
        return _colours(bounded(score_map, max_side), verdict.pixel_threshold)
    if inspection.image is None:
        return None
    frame = bounded(inspection.image, max_side)
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    h, w = frame.shape[:2]
    score = cv2.resize(score_map, (w, h), interpolation=cv2.INTER_LINEAR)
    ramp = (score / verdict.pixel_threshold - _CLEAR_BELOW) / (_OPAQUE_FROM - _CLEAR_BELOW)
    opacity = (np.clip(ramp, 0.0, 1.0) * _MAX_OPACITY)[..., None]
    out = (frame * (1.0 - opacity) + _colours(score, verdict.pixel_threshold) * opacity).astype(np.uint8)
    scale = w / inspection.image.shape[1]
    thickness = max(1, round(max(h, w) / 300))
    for r in verdict.regions:
        x0, y0 = int(r.x * scale), int(r.y * scale)
        x1, y1 = max(x0 + 1, int((r.x + r.w) * scale)), max(y0 + 1, int((r.y + r.h) * scale))
        cv2.rectangle(out, (x0, y0), (min(w - 1, x1), min(h - 1, y1)), _BOX, thickness)
    _banner(out, verdict.status, verdict.normalized_score if verdict.normalized_score is not None
            else verdict.image_score)
    return out


def encode(image: np.ndarray, fmt: ImageFormat) -> bytes:
    """PNG (lossless) or JPEG (quality 90) bytes of a BGR image."""
    if fmt == "png":
        ok, buf = cv2.imencode(".png", image)
    else:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"encoding a {image.shape} image as {fmt} failed")
    return buf.tobytes()


def bounded(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` scaled down (area averaging) so that its longest side is at most ``max_side``."""
    h, w = image.shape[:2]
    f = max_side / max(h, w)
    if f >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def _colours(score_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    grey = np.clip(score_map * (127.5 / pixel_threshold), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(grey, cv2.COLORMAP_JET)


def _banner(image: np.ndarray, status: str, score: float | None) -> None:
    """Status and score top left, on a filled box so they read over any part."""
    text = status.upper() if score is None else f"{status.upper()} {score:.2f}"
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, image.shape[1] / 900)
    thickness = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    pad = max(2, th // 3)
    cv2.rectangle(image, (0, 0), (tw + 2 * pad, th + base + 2 * pad), _BGR.get(status, (90, 90, 90)), -1)
    cv2.putText(image, text, (pad, pad + th), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
