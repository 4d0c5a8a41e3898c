"""The frame source base: a producer thread, a bounded queue, the delivery mode, and the live
supervisor (see agent/sources/__init__.py for the contract)."""
from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import cv2
import numpy as np

from agent.decode import oversize
from agent.frames import Frame
from agent.sources import SourceError, SourceSettings

__all__ = ["BOOT_ID", "CaptureSource", "FrameSource", "SourceStats"]

log = logging.getLogger("agent.sources")

BOOT_ID = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + secrets.token_hex(2)


@dataclass
class SourceStats:
    frames: int = 0        # frames captured (error frames included, dropped ones too)
    dropped: int = 0       # free mode: frames replaced before the consumer took them
    reconnects: int = 0    # times a lost camera/stream connection was re-established
    errors: int = 0        # error frames, failed opens and reads, failed folder listings
    failures: int = 0      # producer failures: each restart of a live source, a batch ended by an exception
    skipped: int = 0       # folder: paths that match but are no file to read (loops, dangling links, folders)
    connected: bool = False


class FrameSource:
    """Base: a producer thread, a bounded queue and the delivery mode.

    Subclasses implement ``_produce``, which captures frames and hands each to ``_emit`` until
    ``_stopping`` is set or, for a batch source, the batch is exhausted. A live source's
    ``_produce`` runs under a supervisor that restarts it whenever it ends before ``stop()``.
    """

    def __init__(self, cfg: SourceSettings, name: str, live: bool, fps: float = 0.0) -> None:
        self.cfg = cfg
        self.name = name
        self.live = live
        self.fps = fps  # pacing of a file source; 0 = as fast as inference takes the frames
        self.failure: str | None = None  # why a batch source ended before its end
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=cfg.queue_size if cfg.mode == "triggered" else 1)
        self._stopping = threading.Event()
        self._exhausted = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = SourceStats()
        self._seq = 0
        self._paced_from = 0.0
        self._unqueued: list[Frame] = []  # captured while stopping, with the queue full

    def start(self) -> None:
        if self._thread is not None:
            raise SourceError(f"source {self.name}: already started")
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None after ``timeout`` seconds (None: wait) or once the source is finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            try:
                return self._queue.get(timeout=max(wait, 0))
            except queue.Empty:
                if self.finished or (deadline is not None and time.monotonic() >= deadline):
                    return None

    def stop(self, timeout: float | None = None) -> None:
        """Stop capturing; frames already queued can still be taken with ``get`` or ``take_queued``."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self._stop_timeout())
            if self._thread.is_alive():
                log.warning("source %s: capture thread did not stop in time", self.name)

    def take_queued(self) -> list[Frame]:
        """The frames queued now, oldest first, without waiting: after ``stop()``, what is left to drain
        (a frame the producer had captured but could not queue before the stop included)."""
        frames = []
        while True:
            try:
                frames.append(self._queue.get_nowait())
            except queue.Empty:
                break
        frames += self._unqueued
        self._unqueued = []
        return frames

    @property
    def finished(self) -> bool:
        """True once the producer has ended (exhausted or stopped) and every frame was taken."""
        return self._exhausted.is_set() and self._queue.empty()

    @property
    def stats(self) -> SourceStats:
        return dataclasses.replace(self._stats)

    # -- for subclasses -------------------------------------------------------------------

    def _produce(self) -> None:
        raise NotImplementedError

    def _stop_timeout(self) -> float:
        return 2.0

    def _run(self) -> None:
        try:
            if self.live:
                self._supervise()
            else:
                self._run_batch()
        finally:
            self._stats.connected = False
            self._exhausted.set()

    def _run_batch(self) -> None:
        try:
            self._produce()
        except Exception as e:
            self._stats.failures += 1
            self.failure = f"capture failed: {type(e).__name__}: {e}"
            log.exception("source %s: capture failed; the batch ends unfinished", self.name)

    def _supervise(self) -> None:
        """Run the producer until ``stop()``, restarting it with backoff whenever it ends before."""
        backoff = self.cfg.reconnect_min_s
        frames_at_last_failure: int | None = None
        while not self._stopping.is_set():
            error: Exception | None = None
            try:
                self._produce()
            except Exception as e:
                error = e
            if error is None and self._stopping.is_set():
                return
            # A new episode: the first failure, or the first since a frame came through again.
            new_episode = frames_at_last_failure is None or self._stats.frames > frames_at_last_failure
            if new_episode:
                backoff = self.cfg.reconnect_min_s
            self._stats.failures += 1
            frames_at_last_failure = self._stats.frames
            what = "ended, but the source is live" if error is None else f"failed: {type(error).__name__}: {error}"
            log.error("source %s: capture %s; restarting in %.2f s", self.name, what, backoff,
                      exc_info=error if new_episode else None)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self.cfg.reconnect_max_s)

    def _next_id(self) -> tuple[str, int]:
        seq = self._seq
        self._seq += 1
        return f"{self.name}-{BOOT_ID}-{seq:08d}", seq

    def _captured(self, img: np.ndarray, where: str, meta: dict[str, Any]) -> Frame:
        """The Frame for a captured image; over ``max_pixels`` it is an error frame saying so."""
        frame_id, seq = self._next_id()
        too_large = oversize(img.shape[1], img.shape[0], self.cfg.max_pixels)
        if too_large is not None:
            return Frame(frame_id, seq, self.name, None, meta=meta, error=f"{where}: frame is {too_large}")
        return Frame(frame_id, seq, self.name, self._image(img), meta=meta)

    def _emit(self, frame: Frame) -> bool:
        """Queue ``frame`` by the delivery mode; False if the source is stopping."""
        self._stats.frames += 1
        if frame.error is not None:
            self._stats.errors += 1
        if self.cfg.mode == "free":
            while True:
                try:
                    self._queue.put_nowait(frame)
                    return True
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self._stats.dropped += 1
                    except queue.Empty:
                        pass  # the consumer took it meanwhile
        while not self._stopping.is_set():
            try:
                self._queue.put(frame, timeout=0.1)
                return True
            except queue.Full:
                continue
        # Captured is captured (in triggered mode, a part passed the camera): keep it for the drain.
        self._unqueued.append(frame)
        return False

    def _pace(self) -> bool:
        """Wait for the next tick of ``fps``; False if the source is stopping meanwhile."""
        if self.fps <= 0:
            return not self._stopping.is_set()
        now = time.monotonic()
        self._paced_from = max(self._paced_from + 1.0 / self.fps, now)
        return not self._stopping.wait(self._paced_from - now)

    def _image(self, img: np.ndarray) -> np.ndarray:
        """The delivery format: HxW grey if ``cfg.grey``, else HxWx3 BGR."""
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        if self.cfg.grey:
            if img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
        elif img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        return img


class CaptureSource(FrameSource):
    """A device or stream that can go away: open, read until it fails, reopen with backoff."""

    def __init__(self, cfg: SourceSettings, name: str) -> None:
        super().__init__(cfg, name, live=True)

    def _open(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def _produce(self) -> None:
        backoff = self.cfg.reconnect_min_s
        lost = False
        while not self._stopping.is_set():
            cap = self._try_open()
            if cap is None:
                log.warning("source %s: cannot open, retrying in %.1f s", self.name, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
                continue
            if lost:
                self._stats.reconnects += 1
                log.info("source %s: reconnected", self.name)
            backoff = self.cfg.reconnect_min_s
            self._stats.connected = True
            try:
                self._read_until_lost(cap)
            finally:
                cap.release()
                self._stats.connected = False
            lost = True

    def _try_open(self) -> cv2.VideoCapture | None:
        try:
            cap = self._open()
        except cv2.error as e:
            cap = None
            log.warning("source %s: open failed: %s", self.name, e)
        if cap is None or not cap.isOpened():
            self._stats.errors += 1
            return None
        return cap

    def _read_until_lost(self, cap: cv2.VideoCapture) -> None:
        while not self._stopping.is_set():
            ok, img = cap.read()
            if not ok or img is None:
                if not self._stopping.is_set():
                    self._stats.errors += 1
                    log.warning("source %s: connection lost (read failed)", self.name)
                return
            if not self._emit(self._captured(img, self.name, {})):
                return


