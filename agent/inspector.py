"""One frame in, one verdict out: scoring, decision, defect regions and the heatmap image.

Every frame gives exactly one verdict; a frame that cannot be read or scored gives an
``error`` verdict naming why, never silence and never a crash of the loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2
import numpy as np

from agent.frames import Frame
from agent.verdict import ModelInfo, Region, Verdict
from engines.decision import Normalizer
from engines.bundle import Bundle
from engines.scorer import Scorer

log = logging.getLogger(__name__)

MAX_REGIONS = 32  # a verdict lists at most this many regions, strongest first


@dataclass
class Inspection:
    verdict: Verdict
    heatmap: bytes | None


class Inspector:
    def __init__(self, bundle: Bundle, scorer: Scorer, heatmap: bool = True, heatmap_max_side: int = 512,
                 heatmap_format: str = "png") -> None:
        m = bundle.manifest
        self.scorer = scorer
        self.threshold = float(m.threshold["threshold"])
        self.normalizer = Normalizer.from_dict(m.normalizer)
        self.model = ModelInfo(id=m.model_id, version=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created)),
                               method=m.method)
        self.heatmap, self.heatmap_max_side = heatmap, heatmap_max_side
        self.heatmap_ext = ".jpg" if heatmap_format == "jpeg" else ".png"

    def inspect(self, frame: Frame) -> Inspection:
        if frame.image is None:
            return Inspection(self.error_verdict(frame, frame.error or "frame has no image"), None)
        try:
            fs = self.scorer.score_frame(frame.image)
        except Exception as e:  # an engine failure is a verdict too; the stream goes on
            log.exception("frame %s: scoring failed", frame.id)
            return Inspection(self.error_verdict(frame, f"engine failure: {type(e).__name__}: {e}"), None)
        if not np.isfinite(fs.score):
            return Inspection(self.error_verdict(frame, f"engine produced a non-finite score ({fs.score})"), None)
        t = time.perf_counter()
        timings = dict(fs.timings_ms)
        ng = fs.score >= self.threshold
        regions = find_regions(fs.map, self.threshold, fs.frame_hw) if ng else []
        timings["verdict"] = (time.perf_counter() - t) * 1000.0
        verdict = Verdict(frame_id=frame.id, seq=frame.seq, source=frame.source, timestamp=frame.t,
                          status="ng" if ng else "ok", model=self.model, image_score=fs.score,
                          threshold=self.threshold, normalized_score=float(self.normalizer.normalize(fs.score)),
                          regions=regions, timings_ms=timings)
        heat = None
        if self.heatmap:
            t = time.perf_counter()
            try:
                heat = encode_heatmap(fs.map, self.threshold, self.heatmap_max_side, self.heatmap_ext)
            except Exception:  # the verdict matters more than its picture
                log.exception("frame %s: heatmap encoding failed; verdict sent without it", frame.id)
            timings["heatmap"] = (time.perf_counter() - t) * 1000.0
        return Inspection(verdict, heat)

    def error_verdict(self, frame: Frame, why: str) -> Verdict:
        """The verdict of a frame that could not be judged, naming why."""
        return Verdict(frame_id=frame.id, seq=frame.seq, source=frame.source, timestamp=frame.t, status="error",
                       model=self.model, error=why)


def find_regions(score_map: np.ndarray, threshold: float, frame_hw: tuple[int, int] | None = None) -> list[Region]:
    """Connected components of ``score_map >= threshold``, strongest first, in frame pixels: a map
    smaller than the frame (``frame_hw``) has its boxes and areas scaled up to it."""
    above = (score_map >= threshold).astype(np.uint8)
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


def encode_heatmap(score_map: np.ndarray, threshold: float, max_side: int, ext: str = ".png") -> bytes:
    """A colour (JET) image where mid-scale is the threshold: red means above it."""
    h, w = score_map.shape
    f = min(1.0, max_side / max(h, w))
    small = cv2.resize(score_map, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else score_map
    grey = np.clip(small * (127.5 / threshold), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(ext, cv2.applyColorMap(grey, cv2.COLORMAP_JET))
    if not ok:
        raise RuntimeError(f"heatmap encoding to {ext} failed")
    return buf.tobytes()
