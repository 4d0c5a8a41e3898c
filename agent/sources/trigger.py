"""``trigger``: one frame per PLC trigger (``<prefix>/cmd/trigger`` over MQTT, or OPC UA's ``Trigger``).

A trigger names a part (``part_id``) and may carry metadata and an image file. With an image
file (under ``image_root``) that file is the frame; without one the frame is the next one the
``capture`` source delivers after the trigger (a free-running camera: the first frame captured
after it; a triggered one: the next in order, for a camera the PLC fires by wire). Each trigger
gives exactly one frame, and so one verdict, carrying the part id and metadata; a capture that
delivers nothing within ``timeout_s`` or an unreadable file gives an error frame, never silence.

Triggers wait in order in a queue of ``queue_size``; when it is full a trigger is refused (the
requester is told), never dropped silently. The source is live: it ends only at ``stop()``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from agent.decode import FrameError, read_image
from agent.frames import Frame
from agent.sources import SOURCES, SourceError, SourceSettings, open_source, plugin
from agent.sources.base import FrameSource
from engines.settings import ConfigPath, SettingError

__all__ = ["TriggerRequest", "TriggerSettings", "TriggerSource"]

log = logging.getLogger("agent.sources")


class TriggerSettings(SourceSettings):
    kind: Literal["trigger"] = "trigger"
    capture: SOURCES.field("synthetic") | None = Field(  # type: ignore[valid-type]
        None, description="the source a trigger takes its frame from (kind: and its keys; live, not trigger); "
                          "null = every trigger names an image file")
    image_root: ConfigPath | None = Field(None, description="a trigger's image_path must lie in this folder; "
                                                            "null = triggers may not name files")
    timeout_s: float = Field(5.0, gt=0.0, description="a trigger waits this long for the capture's next frame, "
                                                      "then gives an error verdict")

    @model_validator(mode="after")
    def _capture(self) -> "TriggerSettings":
        if self.mode != "triggered":
            raise SettingError("mode", "a trigger source is triggered: every trigger gives one verdict")
        if self.capture is not None and self.capture.kind == "trigger":
            raise SettingError("capture.kind", "a trigger cannot capture from another trigger")
        return self


@dataclass
class TriggerRequest:
    """A part to inspect. ``reply`` is called with the verdict's dict once it is judged."""
    part_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    image_path: str | None = None
    reply: Callable[[dict[str, Any]], None] | None = None
    t: float = field(default_factory=time.time)


class TriggerSource(FrameSource):
    def __init__(self, cfg: TriggerSettings) -> None:
        super().__init__(cfg, name="trigger", live=True)
        if cfg.capture is None and cfg.image_root is None:
            raise SourceError("source.capture: give a capture source, an image_root, or both")
        if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
            raise SourceError(f"source.image_root: not a folder: {cfg.image_root}")
        try:
            self.capture = None if cfg.capture is None else open_source(cfg.capture)
        except SourceError as e:
            raise SourceError(str(e).replace("source.", "source.capture.", 1)) from None
        if self.capture is not None and not self.capture.live:
            raise SourceError("source.capture: expected a live source (a camera, a stream, a watched folder, "
                              "endless synthetic)")
        self._requests: queue.Queue[TriggerRequest] = queue.Queue(maxsize=cfg.queue_size)
        self._capture_lock = threading.Lock()

    def request(self, trigger: TriggerRequest) -> str | None:
        """Queue a trigger (any thread); returns why it is refused, or None when queued."""
        if self._stopping.is_set():
            return "the agent is stopping"
        if trigger.image_path is not None:
            why = self._refuse_path(trigger.image_path)
            if why is not None:
                return why
            trigger.image_path = str(Path(self.cfg.image_root, trigger.image_path).resolve())
        elif self.capture is None:
            return "no capture source is configured: give image_path"
        try:
            self._requests.put_nowait(trigger)
        except queue.Full:
            return f"{self._requests.maxsize} triggers are already waiting"
        return None

    def start(self) -> None:
        if self.capture is not None:
            self.capture.start()
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        super().stop(timeout)
        if self.capture is not None:
            self.capture.stop(timeout)

    def _produce(self) -> None:
        self._stats.connected = True
        while not self._stopping.is_set():
            try:
                trigger = self._requests.get(timeout=0.1)
            except queue.Empty:
                continue
            if not self._emit(self._frame(trigger)):
                return

    def _frame(self, trigger: TriggerRequest) -> Frame:
        meta = {"part_id": trigger.part_id, "part_meta": trigger.meta, "reply": trigger.reply}
        if trigger.image_path is not None:
            frame_id, seq = self._next_id()
            path = Path(trigger.image_path)
            try:
                return Frame(frame_id, seq, self.name, read_image(path, self.cfg.max_pixels, self.cfg.grey),
                             t=trigger.t, meta={**meta, "path": str(path)})
            except Exception as e:  # one file's trouble is its own error verdict
                error = str(e) if isinstance(e, FrameError) else f"{path}: cannot read ({type(e).__name__}: {e})"
                return Frame(frame_id, seq, self.name, None, t=trigger.t, meta=meta, error=error)
        captured = self._next_capture(trigger.t)
        frame_id, seq = self._next_id()
        if captured is None:
            return Frame(frame_id, seq, self.name, None, t=trigger.t, meta=meta,
                         error=f"part {trigger.part_id}: no frame from {self.capture.name} within "
                               f"{self.cfg.timeout_s:g} s of the trigger")
        return Frame(frame_id, seq, self.name, captured.image, t=captured.t, meta={**captured.meta, **meta},
                     error=captured.error)

    def _next_capture(self, since: float) -> Frame | None:
        """The capture's frame for a trigger at ``since``: free-running, the first taken after it."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while not self._stopping.is_set() and time.monotonic() < deadline:
            frame = self.capture.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            if frame is None:
                continue
            if self.capture.cfg.mode == "triggered" or frame.t >= since:
                return frame
        return None

    def _refuse_path(self, image_path: str) -> str | None:
        root = self.cfg.image_root
        if root is None:
            return "image_path is not accepted (source.image_root is not set)"
        resolved = Path(root, image_path).resolve()
        if not resolved.is_relative_to(Path(root).resolve()):
            return f"image_path {image_path!r} is outside source.image_root"
        return None


PLUGINS = [plugin("trigger", TriggerSettings, "agent.sources.trigger",
                  "one frame per PLC trigger (MQTT cmd/trigger, OPC UA Trigger): from a capture source or a file")]
SOURCE = TriggerSource
