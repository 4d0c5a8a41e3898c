"""The agent's own figures: frames, verdict counts, frames/s, per-stage timings and their histograms.

The inspection loop records every verdict and, every ``mqtt.health_interval_s``, takes a report
(the MQTT health payload), which closes a measurement window. Other threads (the page,
``/metrics``) read ``figures()``: the counts so far, the last closed window's frames/s and stage
times (the figures the last health message had), and the stage-latency histograms.
"""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.verdict import Verdict

__all__ = ["STAGE_BUCKETS_S", "Figures", "Health"]

# Upper bounds of the stage-latency histogram buckets, seconds (+Inf is implied).
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Figures:
    """A consistent copy of the figures, for another thread."""
    started: float                 # epoch seconds
    frames: int
    ok: int
    ng: int
    errors: int
    fps: float                     # frames/s of the last closed window (the current one before any)
    stage_ms: dict[str, float]     # mean ms per stage over that window
    # Stage -> (cumulative count per bucket of STAGE_BUCKETS_S then +Inf, sum of seconds).
    histograms: dict[str, tuple[list[int], float]]


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
    _last_window: tuple[float, dict[str, float]] | None = None  # fps and stage ms of the last closed window
    _buckets: dict[str, list[int]] = field(default_factory=dict)  # stage -> count per bucket, +Inf last
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, verdict: Verdict, loop_ms: float) -> None:
        with self._lock:
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
                counts = self._buckets.setdefault(stage, [0] * (len(STAGE_BUCKETS_S) + 1))
                counts[bisect.bisect_left(STAGE_BUCKETS_S, ms / 1000.0)] += 1

    def report(self, **extra: Any) -> dict[str, Any]:
        """The health payload; starts a new measurement window."""
        with self._lock:
            now = time.monotonic()
            fps, stage_ms, span = self._window(now)
            payload = {"timestamp": time.time(), "uptime_s": time.time() - self.started,
                       "frames": self.frames, "ok": self.ok, "ng": self.ng, "errors": self.errors,
                       "fps": fps, "window_s": span, "stage_ms": stage_ms,
                       # Since the first frame: the figures a benchmark of the running agent wants.
                       "fps_overall": self.frames / max(now - (self._first_frame or now), 1e-9),
                       "stage_ms_overall": {k: v / max(self.frames, 1) for k, v in sorted(self._total_ms.items())},
                       **extra}
            self._last_window = (fps, stage_ms)
            self._window_start, self._window_frames, self._window_ms = now, 0, {}
        return payload

    def figures(self) -> Figures:
        with self._lock:
            fps, stage_ms = self._last_window or self._window(time.monotonic())[:2]
            histograms = {stage: (_cumulative(counts), self._total_ms[stage] / 1000.0)
                          for stage, counts in sorted(self._buckets.items())}
            return Figures(started=self.started, frames=self.frames, ok=self.ok, ng=self.ng, errors=self.errors,
                           fps=fps, stage_ms=dict(stage_ms), histograms=histograms)

    def _window(self, now: float) -> tuple[float, dict[str, float], float]:
        span = max(now - self._window_start, 1e-9)
        n = max(self._window_frames, 1)
        return self._window_frames / span, {k: v / n for k, v in sorted(self._window_ms.items())}, span


def _cumulative(counts: list[int]) -> list[int]:
    out, running = [], 0
    for c in counts:
        running += c
        out.append(running)
    return out
