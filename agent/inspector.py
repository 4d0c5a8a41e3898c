"""One frame in, one verdict out: the pipeline's scores, the decision (engines/decision.py) and
the heatmap image.

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
from agent.verdict import ModelInfo, Verdict
from engines.bundle import Bundle
from engines.decision import judge
from engines.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class Inspection:
    verdict: Verdict
    heatmap: bytes | None


class Inspector:
    def __init__(self, bundle: Bundle, pipeline: Pipeline, heatmap: bool = True, heatmap_max_side: int = 512,
                 heatmap_format: str = "png") -> None:
        m = bundle.manifest
        self.pipeline = pipeline
        self.decision = m.decision
        self.model = ModelInfo(id=m.model_id, version=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created)),
                               method=m.method)
        self.heatmap, self.heatmap_max_side = heatmap, heatmap_max_side
        self.heatmap_ext = ".jpg" if heatmap_format == "jpeg" else ".png"

    def inspect(self, frame: Frame) -> Inspection:
        if frame.image is None:
            return Inspection(self.error_verdict(frame, frame.error or "frame has no image"), None)
        try:
            fs = self.pipeline.score_frame(frame.image)
        except Exception as e:  # an engine failure is a verdict too; the stream goes on
            log.exception("frame %s: scoring failed", frame.id)
            return Inspection(self.error_verdict(frame, f"engine failure: {type(e).__name__}: {e}"), None)
        if not np.isfinite(fs.score):
            return Inspection(self.error_verdict(frame, f"engine produced a non-finite score ({fs.score})"), None)
        t = time.perf_counter()
        timings = dict(fs.timings_ms)
        judged = judge(fs.map, fs.score, fs.frame_hw, self.decision)
        timings["verdict"] = (time.perf_counter() - t) * 1000.0
        verdict = Verdict(frame_id=frame.id, seq=frame.seq, source=frame.source, timestamp=frame.t,
                          status=judged.status, model=self.model, image_score=judged.image_score,
                          threshold=self.decision.image_threshold, normalized_score=judged.normalized_score,
                          pixel_threshold=self.decision.pixel_threshold, regions=judged.regions, timings_ms=timings)
        heat = None
        if self.heatmap:
            t = time.perf_counter()
            try:
                heat = encode_heatmap(fs.map, self.decision.pixel_threshold, self.heatmap_max_side, self.heatmap_ext)
            except Exception:  # the verdict matters more than its picture
                log.exception("frame %s: heatmap encoding failed; verdict sent without it", frame.id)
            timings["heatmap"] = (time.perf_counter() - t) * 1000.0
        return Inspection(verdict, heat)

    def error_verdict(self, frame: Frame, why: str) -> Verdict:
        """The verdict of a frame that could not be judged, naming why."""
        return Verdict(frame_id=frame.id, seq=frame.seq, source=frame.source, timestamp=frame.t, status="error",
                       model=self.model, error=why)


def encode_heatmap(score_map: np.ndarray, threshold: float, max_side: int, ext: str = ".png") -> bytes:
    """A colour (JET) image where mid-scale is the pixel threshold: red means above it."""
    h, w = score_map.shape
    f = min(1.0, max_side / max(h, w))
    small = cv2.resize(score_map, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else score_map
    grey = np.clip(small * (127.5 / threshold), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(ext, cv2.applyColorMap(grey, cv2.COLORMAP_JET))
    if not ok:
        raise RuntimeError(f"heatmap encoding to {ext} failed")
    return buf.tobytes()
