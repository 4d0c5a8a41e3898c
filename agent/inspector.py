"""One frame in, one inspection out: the pipeline's scores and the decision (engines/decision.py),
with the frame and its score map kept for the sinks' images (agent/overlay.py).

Every frame gives exactly one verdict; a frame that cannot be read or scored gives an
``error`` verdict naming why, never silence and never a crash of the loop.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from agent.frames import Frame
from agent.verdict import Inspection, ModelInfo, Verdict
from engines.bundle import Bundle
from engines.decision import judge
from engines.pipeline import Pipeline

__all__ = ["Inspector"]

log = logging.getLogger(__name__)


class Inspector:
    def __init__(self, bundle: Bundle, pipeline: Pipeline) -> None:
        m = bundle.manifest
        self.pipeline = pipeline
        self.decision = m.decision
        self.model = ModelInfo.of(m.model_id, m.created, m.method)

    def inspect(self, frame: Frame) -> Inspection:
        if frame.image is None:
            return Inspection(self.error_verdict(frame, frame.error or "frame has no image"))
        try:
            fs = self.pipeline.score_frame(frame.image)
        except Exception as e:  # an engine failure is a verdict too; the stream goes on
            log.exception("frame %s: scoring failed", frame.id)
            return Inspection(self.error_verdict(frame, f"engine failure: {type(e).__name__}: {e}"))
        if not np.isfinite(fs.score):
            return Inspection(self.error_verdict(frame, f"engine produced a non-finite score ({fs.score})"))
        t = time.perf_counter()
        timings = dict(fs.timings_ms)
        judged = judge(fs.map, fs.score, fs.frame_hw, self.decision)
        timings["verdict"] = (time.perf_counter() - t) * 1000.0
        verdict = Verdict(frame_id=frame.id, seq=frame.seq, source=frame.source, timestamp=frame.t,
                          status=judged.status, model=self.model, image_score=judged.image_score,
                          threshold=self.decision.image_threshold, normalized_score=judged.normalized_score,
                          pixel_threshold=self.decision.pixel_threshold, regions=judged.regions, timings_ms=timings,
                          **_part(frame))
        return Inspection(verdict, frame.image, fs.map)

    def error_verdict(self, frame: Frame, why: str) -> Verdict:
        """The verdict of a frame that could not be judged, naming why."""
        return Verdict(frame_id=frame.id, seq=frame.seq, source=frame.source, timestamp=frame.t, status="error",
                       model=self.model, error=why, **_part(frame))


def _part(frame: Frame) -> dict[str, Any]:
    """The part a trigger named (agent/sources/trigger.py), echoed in its verdict."""
    if "part_id" not in frame.meta:
        return {}
    return {"part_id": frame.meta["part_id"], "part_meta": frame.meta.get("part_meta") or {}}
