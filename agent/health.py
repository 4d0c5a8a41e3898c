"""The agent's own figures: frames, verdict counts, frames/s and mean per-stage timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent.verdict import Verdict


@dataclass
class Health:
    started: float = field(default_factory=time.time)
    frames: int = 0
    ok: int = 0
    ng: int = 0
    errors: int = 0
    # Since the last report: frames and summed stage times, so each report is a fresh window.
    _window_start: float = field(default_factory=time.monotonic)
    _window_frames: int = 0
    _window_ms: dict[str, float] = field(default_factory=dict)
    _total_ms: dict[str, float] = field(default_factory=dict)
    _first_frame: float | None = None

    def record(self, verdict: Verdict, loop_ms: float) -> None:
        self.frames += 1
        if verdict.status == "ok":
            self.ok += 1
        elif verdict.status == "ng":
            self.ng += 1
        else:
            self.errors += 1
        self._window_frames += 1
        self._first_frame = self._first_frame or time.monotonic() - loop_ms / 1000.0
        for stage, ms in {**verdict.timings_ms, "total": loop_ms}.items():
            self._window_ms[stage] = self._window_ms.get(stage, 0.0) + ms
            self._total_ms[stage] = self._total_ms.get(stage, 0.0) + ms

    def report(self, **extra: Any) -> dict[str, Any]:
        """The health payload; starts a new measurement window."""
        now = time.monotonic()
        span = max(now - self._window_start, 1e-9)
        n = max(self._window_frames, 1)
        payload = {"timestamp": time.time(), "uptime_s": time.time() - self.started,
                   "frames": self.frames, "ok": self.ok, "ng": self.ng, "errors": self.errors,
                   "fps": self._window_frames / span, "window_s": span,
                   "stage_ms": {k: v / n for k, v in sorted(self._window_ms.items())},
                   # Since the first frame: the figures a benchmark of the running agent wants.
                   "fps_overall": self.frames / max(now - (self._first_frame or now), 1e-9),
                   "stage_ms_overall": {k: v / max(self.frames, 1) for k, v in sorted(self._total_ms.items())},
                   **extra}
        self._window_start, self._window_frames, self._window_ms = now, 0, {}
        return payload
