"""Frame sources: each runs in its own thread and hands Frames to the pipeline through a bounded queue.

Kinds: ``folder`` (image files, once or watching for new ones), ``video`` (a file, ends at EOF),
``camera`` (V4L2 index), ``stream`` (RTSP/HTTP through FFmpeg) and ``synthetic`` (generated
parts with their true defect masks, for demos and tests).

Two delivery modes:

- ``triggered``: one frame per part, nothing may be lost. The producer blocks while the queue
  (``queue_size``) is full.
- ``free``: a free-running camera or stream. Only the newest frame is kept: a backlog would
  be stale, so an unconsumed frame is replaced by the next one and counted in ``stats.dropped``.

Frame ids are stable and unique:

- folder: the file stem (``part_0012.png`` -> ``part_0012``); a stem seen before from this
  source gets ``-2``, ``-3``... appended.
- everything else: ``{source name}-{BOOT_ID}-{seq:08d}``, e.g. ``camera0-20250101T120000a3f2-00000042``.
  BOOT_ID is fixed per process (UTC start time plus 4 random hex digits), so ids stay unique
  across restarts while ``seq`` counts from 0 for each source. Dropped frames leave gaps in seq.

A lost camera or stream is reopened with exponential backoff (``reconnect_min_s`` doubling up
to ``reconnect_max_s``); the thread logs it, counts it and keeps running. A file that cannot
be read becomes a Frame with ``image=None`` and ``error`` naming the path.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from agent.frames import Frame
from calibration.data import IMAGE_SUFFIXES
from calibration.synthetic import DEFECT_KINDS, synthetic_part
from engines.settings import ConfigPath, SettingError, Settings

log = logging.getLogger(__name__)

BOOT_ID = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + secrets.token_hex(2)

# URL schemes handed to FFmpeg; anything else with " ! " in it is read as a GStreamer pipeline.
_FFMPEG_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


class SourceError(ValueError):
    """A source that cannot be set up as configured (raised in the caller's thread, never the source's);
    the message starts with the key, e.g. ``source.url: ...``."""


class SourceConfig(Settings):
    kind: Literal["folder", "video", "camera", "stream", "synthetic"] = Field(
        "synthetic", description="folder | video | camera | stream | synthetic")
    path: ConfigPath | None = Field(None, description="folder of images, or a video file")
    watch: bool = Field(False, description="folder: keep watching for new files (each file once)")
    pattern: str | None = Field(None, description="folder: file-name glob; null = image files")
    poll_s: float = Field(0.5, gt=0.0, description="folder watch: rescan interval, seconds")
    settle_s: float = Field(1.0, ge=0.0, description="folder watch: a file is taken once its size and mtime "
                                                     "held still this long; 0 = at first sight (writers that "
                                                     "rename complete files into the folder)")
    max_pixels: int = Field(50_000_000, ge=1024, description="largest frame accepted (width x height, read "
                                                             "from the file header before decoding); larger "
                                                             "frames give an error verdict")
    index: int = Field(0, ge=0, description="camera: V4L2 index (/dev/videoN)")
    url: str = Field("", description="stream: rtsp://... or http://... (FFmpeg; PyPI OpenCV has no GStreamer)")
    open_timeout_s: float = Field(5.0, gt=0.0, description="camera/stream open timeout")
    read_timeout_s: float = Field(5.0, gt=0.0, description="stream read timeout")
    reconnect_min_s: float = Field(0.5, gt=0.0, description="reconnect backoff starts here ...")
    reconnect_max_s: float = Field(30.0, gt=0.0, description="... and doubles up to here")
    mode: Literal["triggered", "free"] = Field(
        "triggered", description="triggered: never drop, block the source | free: keep the newest frame, "
                                 "count drops")
    queue_size: int = Field(8, ge=1, description="triggered mode: frames buffered between source and inference")
    fps: float = Field(0.0, ge=0.0, description="pacing for folder/video/synthetic; 0 = as fast as inference "
                                                "takes them")
    count: int = Field(0, ge=0, description="synthetic: number of frames; 0 = endless")
    size: list[int] = Field(default_factory=lambda: [256, 256], min_length=2, max_length=2,
                            description="synthetic: frame [height, width]")
    defect_rate: float = Field(0.2, ge=0.0, le=1.0, description="synthetic: share of frames with a drawn defect")
    seed: int = Field(0, description="synthetic: random seed")
    grey: bool = Field(False, description="deliver grey frames instead of BGR")

    @model_validator(mode="after")
    def _consistent(self) -> "SourceConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise SettingError("reconnect_max_s", f"expected at least reconnect_min_s ({self.reconnect_min_s}), "
                                                  f"got {self.reconnect_max_s}")
        if min(self.size) < 32:
            raise SettingError("size", f"expected [height, width], each at least 32, got {self.size}")
        return self


@dataclass
class SourceStats:
    frames: int = 0        # frames captured (error frames included, dropped ones too)
    dropped: int = 0       # free mode: frames replaced before the consumer took them
    reconnects: int = 0    # times a lost camera/stream connection was re-established
    errors: int = 0        # unreadable files, failed opens and failed reads
    connected: bool = False


class FrameSource:
    """Base: a producer thread, a bounded queue and the delivery mode.

    Subclasses implement ``_produce``, which captures frames and hands each to ``_emit``
    until ``_stopping`` is set or the source is exhausted.
    """

    def __init__(self, cfg: SourceConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=cfg.queue_size if cfg.mode == "triggered" else 1)
        self._stopping = threading.Event()
        self._exhausted = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = SourceStats()
        self._seq = 0
        self._paced_from = 0.0
        self.failure: str | None = None   # why a batch source ended before its end

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
        """Stop capturing; frames already queued can still be taken with ``get``."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self._stop_timeout())
            if self._thread.is_alive():
                log.warning("source %s: capture thread did not stop in time", self.name)

    def take_queued(self) -> list[Frame]:
        """The frames still queued (after ``stop``), without waiting."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

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
            self._produce()
        except Exception:
            # A bug, not a capture problem (those are handled where they happen): log it loudly.
            self._stats.errors += 1
            log.exception("source %s: capture thread failed", self.name)
        finally:
            self._stats.connected = False
            self._exhausted.set()

    def _next_id(self) -> tuple[str, int]:
        seq = self._seq
        self._seq += 1
        return f"{self.name}-{BOOT_ID}-{seq:08d}", seq

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
        return False

    def _pace(self) -> bool:
        """Wait for the next tick of ``cfg.fps``; False if the source is stopping meanwhile."""
        if self.cfg.fps <= 0:
            return not self._stopping.is_set()
        now = time.monotonic()
        self._paced_from = max(self._paced_from + 1.0 / self.cfg.fps, now)
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


class FolderSource(FrameSource):
    """Image files in a folder, in name order. Batch mode ends after the last file; watch
    mode then keeps polling and reads each new file once, when it has stopped changing."""

    def __init__(self, cfg: SourceConfig) -> None:
        if cfg.path is None or not Path(cfg.path).is_dir():
            raise SourceError(f"source.path: not a folder: {cfg.path}")
        super().__init__(cfg, name=f"folder-{Path(cfg.path).name}")
        self.folder = Path(cfg.path)
        self._seen: set[Path] = set()
        self._ids: set[str] = set()

    def _produce(self) -> None:
        if not self.cfg.watch:
            for path in self._listing():
                if not (self._pace() and self._emit(self._read(path))):
                    return
            return
        pending: dict[Path, tuple[int, int]] = {}
        while not self._stopping.is_set():
            try:
                listing = self._listing()
            except OSError as e:
                self._stats.errors += 1
                log.warning("source %s: cannot list %s: %s", self.name, self.folder, e)
                listing = []
            for path in listing:
                if path in self._seen:
                    continue
                # Read only once size and mtime held still for a poll: the writer is done.
                signature = self._signature(path)
                if signature is None or pending.get(path) != signature:
                    if signature is not None:
                        pending[path] = signature
                    continue
                del pending[path]
                if not (self._pace() and self._emit(self._read(path))):
                    return
            self._stopping.wait(self.cfg.poll_s)

    def _listing(self) -> list[Path]:
        if self.cfg.pattern is not None:
            paths = self.folder.glob(self.cfg.pattern)
        else:
            paths = (p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return sorted(p for p in paths if p.is_file())

    @staticmethod
    def _signature(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None  # gone again (renamed, deleted); a new name shows up in the next listing
        return st.st_size, st.st_mtime_ns

    def _read(self, path: Path) -> Frame:
        self._seen.add(path)
        frame_id, seq = self._file_id(path.stem), self._seq
        self._seq += 1
        meta = {"path": str(path)}
        try:
            data = np.fromfile(path, np.uint8)
        except OSError as e:
            return Frame(frame_id, seq, self.name, None, meta=meta, error=f"{path}: cannot read file: {e}")
        flags = cv2.IMREAD_GRAYSCALE if self.cfg.grey else cv2.IMREAD_COLOR
        img = cv2.imdecode(data, flags) if data.size else None
        if img is None:
            log.warning("source %s: cannot decode %s", self.name, path)
            return Frame(frame_id, seq, self.name, None, meta=meta,
                         error=f"{path}: cannot decode image (corrupt, empty or unsupported format)")
        return Frame(frame_id, seq, self.name, self._image(img), meta=meta)

    def _file_id(self, stem: str) -> str:
        frame_id, n = stem, 1
        while frame_id in self._ids:
            n += 1
            frame_id = f"{stem}-{n}"
        self._ids.add(frame_id)
        return frame_id


class VideoSource(FrameSource):
    """A video file, frame by frame; ends at EOF. A file that will not open gives one error frame."""

    def __init__(self, cfg: SourceConfig) -> None:
        if cfg.path is None or not Path(cfg.path).is_file():
            raise SourceError(f"source.path: video file not found: {cfg.path}")
        super().__init__(cfg, name=f"video-{Path(cfg.path).stem}")
        self.path = Path(cfg.path)

    def _produce(self) -> None:
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                frame_id, seq = self._next_id()
                self._emit(Frame(frame_id, seq, self.name, None, meta={"path": str(self.path)},
                                 error=f"{self.path}: cannot open video (corrupt or unsupported codec)"))
                return
            self._stats.connected = True
            while self._pace():
                pos = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
                ok, img = cap.read()
                if not ok or img is None:
                    return  # EOF
                frame_id, seq = self._next_id()
                if not self._emit(Frame(frame_id, seq, self.name, self._image(img),
                                        meta={"path": str(self.path), "pos": pos})):
                    return
        finally:
            cap.release()


class LiveSource(FrameSource):
    """A device or stream that can go away: open, read until it fails, reopen with backoff."""

    def _open(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def _stop_timeout(self) -> float:
        # A blocked open or read returns within its own timeout.
        return self.cfg.open_timeout_s + self.cfg.read_timeout_s + 1.0

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
            frame_id, seq = self._next_id()
            if not self._emit(Frame(frame_id, seq, self.name, self._image(img))):
                return


class CameraSource(LiveSource):
    """A V4L2 camera by index (/dev/video<index>)."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg, name=f"camera{cfg.index}")

    def _open(self) -> cv2.VideoCapture:
        return cv2.VideoCapture(self.cfg.index, cv2.CAP_V4L2)


class StreamSource(LiveSource):
    """An RTSP/HTTP/... stream through OpenCV's FFmpeg backend, with open and read timeouts.

    A GStreamer pipeline (text with `` ! `` in it) needs an OpenCV built with GStreamer; the
    PyPI wheels are built without it, which is detected here and refused with an explanation.
    """

    def __init__(self, cfg: SourceConfig) -> None:
        url = cfg.url.strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in _FFMPEG_SCHEMES:
            self.backend = cv2.CAP_FFMPEG
        elif " ! " in url:
            if not gstreamer_available():
                raise SourceError(
                    f"source.url: {url!r} is a GStreamer pipeline, but this OpenCV ({cv2.__version__}) was built "
                    "without GStreamer (cv2.getBuildInformation() says 'GStreamer: NO'; the PyPI "
                    "opencv-python wheels never include it). Use an rtsp:// or http:// URL, which OpenCV "
                    "reads through FFmpeg, or install an OpenCV built with GStreamer (e.g. the one "
                    "JetPack ships, or a source build with -DWITH_GSTREAMER=ON).")
            self.backend = cv2.CAP_GSTREAMER
        else:
            raise SourceError(f"source.url: expected a stream URL ({', '.join(s + '://' for s in _FFMPEG_SCHEMES)}) "
                              f"or a GStreamer pipeline, got {cfg.url!r}")
        super().__init__(cfg, name="stream")
        self.url = url

    def _open(self) -> cv2.VideoCapture:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000)]
        return cv2.VideoCapture(self.url, self.backend, params)


class SyntheticSource(FrameSource):
    """Generated parts (calibration/synthetic.py); meta['mask'] holds the true defect mask and
    meta['defect'] its kind (None for a good part)."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg, name="synthetic")
        self._rng = np.random.default_rng(cfg.seed)

    def _produce(self) -> None:
        self._stats.connected = True
        size = (int(self.cfg.size[0]), int(self.cfg.size[1]))
        while (self.cfg.count == 0 or self._seq < self.cfg.count) and self._pace():
            defect = None
            if self._rng.random() < self.cfg.defect_rate:
                defect = DEFECT_KINDS[self._rng.integers(len(DEFECT_KINDS))]
            img, mask = synthetic_part(self._rng, size, defect)
            frame_id, seq = self._next_id()
            if not self._emit(Frame(frame_id, seq, self.name, self._image(img),
                                    meta={"mask": mask, "defect": defect})):
                return


def gstreamer_available() -> bool:
    """Whether this OpenCV build reads GStreamer pipelines (the Video I/O section of its build info)."""
    match = re.search(r"^\s*GStreamer:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return match is not None and match.group(1).upper() != "NO"


_KINDS: dict[str, type[FrameSource]] = {
    "folder": FolderSource, "video": VideoSource, "camera": CameraSource,
    "stream": StreamSource, "synthetic": SyntheticSource,
}


def open_source(cfg: SourceConfig) -> FrameSource:
    """The source for ``cfg``, checked but not started; raises SourceError naming what is wrong."""
    if cfg.kind not in _KINDS:
        raise SourceError(f"source.kind: expected one of {', '.join(_KINDS)}, got {cfg.kind!r}")
    return _KINDS[cfg.kind](cfg)
