"""The live page's data: the last frames (a sink) and the state the page polls.

``RecentFrames`` is handed every inspection by the inspection loop and keeps only references to
the last few (and the last NG one): no copy, no rendering on that thread. Their images are
rendered when the page asks for them, on the HTTP server's thread, and cached while the frame
is among the recent ones. The page itself is ``page.html`` beside this file: plain HTML and a
little JavaScript that polls ``/api/state`` (``state``) once a second.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from agent import overlay
from agent.health import Figures
from agent.verdict import Inspection

__all__ = ["PAGE_HTML", "PageImage", "RecentFrames", "state"]

PAGE_HTML = (Path(__file__).with_name("page.html")).read_bytes()

PageImage = Literal["overlay", "frame"]


class RecentFrames:
    """The page's sink: the last ``size`` inspections and the last NG one."""

    def __init__(self, size: int, image_max_side: int) -> None:
        self.image_max_side = image_max_side
        self._recent: collections.deque[Inspection] = collections.deque(maxlen=size)
        self._last_ng: Inspection | None = None
        self._images: dict[tuple[str, PageImage], bytes] = {}
        self._lock = threading.Lock()

    def publish(self, inspection: Inspection) -> None:
        with self._lock:
            self._recent.append(inspection)
            if inspection.verdict.status == "ng":
                self._last_ng = inspection

    def summaries(self) -> dict[str, Any]:
        """The recent frames, newest first, and the last NG frame, as the page shows them."""
        with self._lock:
            recent, last_ng = list(self._recent), self._last_ng
        return {"recent": [_summary(i) for i in reversed(recent)],
                "last_ng": None if last_ng is None else _summary(last_ng)}

    def image(self, frame_id: str, kind: PageImage) -> bytes | None:
        """JPEG of a recent frame (``frame``) or its overlay; None when the frame is no longer kept or
        has no such image."""
        with self._lock:
            kept = [i for i in (*self._recent, self._last_ng) if i is not None]
            self._images = {key: data for key, data in self._images.items()
                            if any(i.verdict.frame_id == key[0] for i in kept)}
            cached = self._images.get((frame_id, kind))
        if cached is not None:
            return cached
        inspection = next((i for i in kept if i.verdict.frame_id == frame_id), None)
        if inspection is None:
            return None
        if kind == "overlay":
            image = overlay.render(inspection, "overlay", self.image_max_side)
        else:
            image = None if inspection.image is None else overlay.bounded(inspection.image, self.image_max_side)
        if image is None:
            return None
        data = overlay.encode(image, "jpeg")
        with self._lock:
            self._images[(frame_id, kind)] = data
        return data


def state(figures: Figures, status: dict[str, Any], frames: dict[str, Any]) -> dict[str, Any]:
    """What ``/api/state`` answers: the figures, the service's status and the recent frames."""
    return {"timestamp": time.time(), "uptime_s": time.time() - figures.started,
            **{k: v for k, v in asdict(figures).items() if k != "histograms"}, **status, **frames}


def _summary(inspection: Inspection) -> dict[str, Any]:
    v = inspection.verdict
    quoted = quote(v.frame_id, safe="")
    has_map = inspection.score_map is not None
    return {"frame_id": v.frame_id, "status": v.status, "timestamp": v.timestamp,
            "score": v.normalized_score, "regions": len(v.regions), "error": v.error,
            "overlay": f"/images/overlay/{quoted}" if has_map and inspection.image is not None else None,
            "frame": f"/images/frame/{quoted}" if inspection.image is not None else None}
