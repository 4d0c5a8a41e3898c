"""Frame sources: each runs in its own thread and hands Frames to the pipeline through a bounded queue.

Kinds: ``folder`` (image files, read once or watched for new ones), ``video`` (a file),
``camera`` (V4L2 index), ``stream`` (RTSP/HTTP through FFmpeg) and ``synthetic`` (generated
parts with their true defect masks, for demos and tests).

Live and batch sources:

- Live (camera, stream, a watched folder, synthetic with ``count: 0``): never finishes until
  ``stop()``. Whatever else ends its producer (an exception, a bug) is logged, with the
  traceback once per episode and one line for each repeat, counted in ``stats.failures``, and
  the producer is restarted after a backoff (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``). An episode ends when a frame comes through again. Within the producer,
  a lost camera or stream is reopened with the same backoff and counted in ``stats.reconnects``.
- Batch (a folder without watch, a video, synthetic with ``count > 0``): finishes at its end.
  When it ends early instead, because its producer raised or the video would not open,
  ``failure`` says why: the batch was not read to its end, and the service exits non-zero.

Every frame taken gives exactly one Frame. A file that cannot be read or decoded (see
agent/decode.py: empty, corrupt, truncated, unsupported, a decompression bomb) and a frame of
more than ``max_pixels`` pixels from any source become a Frame with ``image=None`` and
``error`` naming the file or source and the reason.

Two delivery modes:

- ``triggered``: one frame per part, nothing may be lost. The producer blocks while the queue
  (``queue_size``) is full.
- ``free``: a free-running camera or stream. Only the newest frame is kept: a backlog would
  be stale, so an unconsumed frame is replaced by the next one and counted in ``stats.dropped``.

After ``stop()``, ``take_queued()`` hands over the frames still queued, for the service to drain.

Frame ids are stable and unique:

- folder, batch: the file stem (``part_0012.png`` -> ``part_0012``); a stem seen before from this
  source gets ``-2``, ``-3``... appended.
- folder, watch: ``{stem}-{h}``, h being the hex blake2s digest (4 bytes, 8 digits) of
  ``"{size}:{mtime_ns}:{inode}"``. The same file read again after a restart keeps its id; a
  name reused for new content gets a new one.
- everything else: ``{source name}-{BOOT_ID}-{seq:08d}``, e.g. ``camera0-20250101T120000a3f2-00000042``.
  BOOT_ID is fixed per process (UTC start time plus 4 random hex digits), so ids stay unique
  across restarts while ``seq`` counts from 0 for each source. Dropped frames leave gaps in seq.

A watched folder takes a file once it is complete: when its size and mtime have held still for
``settle_s`` (0: at first sight, for writers that write elsewhere and rename complete files into
the folder). A file is known by (size, mtime_ns, inode), so a rewritten or replaced file is
taken again as a new frame. The source remembers only files of the latest listing: a file that
leaves the folder and comes back is read again, with the same id. Symlink loops, dangling
links, directories and other non-files whose names match are skipped, with one log line per
path while it stays, and counted in ``stats.skipped``. A folder that cannot be listed (removed,
unreadable) is logged once per episode, counted in ``stats.errors`` at each try and listed
again every ``poll_s``; the source goes on when it is back.
"""
from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import logging
import os
import queue
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from agent.decode import FrameError, oversize, read_image
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
    watch: bool = Field(False, description="folder: keep watching for new files (each version of a file once)")
    pattern: str | None = Field(None, description="folder: file-name glob (fnmatch, case-sensitive); "
                                                  "null = image files by suffix")
    poll_s: float = Field(0.5, gt=0.0, description="folder watch: rescan interval, seconds")
    settle_s: float = Field(1.0, ge=0.0, description="folder watch: a file is taken once its size and mtime "
                                                     "held still this long; 0 = at first sight (writers that "
                                                     "rename complete files into the folder)")
    max_pixels: int = Field(50_000_000, ge=1024, description="largest frame accepted (width x height, read "
                                                             "from the file header before decoding); larger "
                                                             "frames give an error verdict. Image files are "
                                                             "also held to Pillow's decompression-bomb limit "
                                                             "(about 179 M pixels)")
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

    def __init__(self, cfg: SourceConfig, name: str, live: bool) -> None:
        self.cfg = cfg
        self.name = name
        self.live = live
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


# A watched file's version: (size, mtime_ns, inode).
_Version = tuple[int, int, int]


class FolderSource(FrameSource):
    """Image files in a folder, in name order. Batch mode ends after the last file; watch mode
    keeps listing the folder and reads each version of a file once, when it has stopped changing."""

    def __init__(self, cfg: SourceConfig) -> None:
        if cfg.path is None or not Path(cfg.path).is_dir():
            raise SourceError(f"source.path: not a folder: {cfg.path}")
        super().__init__(cfg, name=f"folder-{Path(cfg.path).name}", live=cfg.watch)
        self.folder = Path(cfg.path)
        self._ids: set[str] = set()                            # batch: ids given, for -2, -3
        self._taken: dict[Path, _Version] = {}                 # watch: the version read of each file
        self._pending: dict[Path, tuple[_Version, float]] = {}  # watch: a version and since when it held still
        self._skipping: set[Path] = set()                      # paths skipped (and logged) in the last listing
        self._unlisted = False                                 # watch: the folder could not be listed last time

    def _produce(self) -> None:
        if self.cfg.watch:
            self._watch()
        else:
            self._read_all()

    def _read_all(self) -> None:
        for path in self._files():
            if not (self._pace() and self._emit(self._read(path, self._batch_id(path.stem)))):
                return

    def _watch(self) -> None:
        while not self._stopping.is_set():
            for path, version in self._poll().items():
                if self._settled(path, version) and not self._take(path, version):
                    return
            self._stopping.wait(self.cfg.poll_s)

    def _poll(self) -> dict[Path, _Version]:
        """The files listed now with their version; none while the folder cannot be listed."""
        try:
            files = self._files()
        except OSError as e:
            self._stats.errors += 1
            if not self._unlisted:
                log.warning("source %s: cannot list %s (%s); trying again every %.2f s",
                            self.name, self.folder, e.strerror or e, self.cfg.poll_s)
            self._unlisted = True
            return {}
        if self._unlisted:
            log.info("source %s: %s can be listed again", self.name, self.folder)
            self._unlisted = False
        # Remember only what is still there: the memory stays as small as the folder.
        self._taken = {p: v for p, v in self._taken.items() if p in files}
        self._pending = {p: held for p, held in self._pending.items() if p in files}
        return {path: (st.st_size, st.st_mtime_ns, st.st_ino) for path, st in files.items()}

    def _settled(self, path: Path, version: _Version) -> bool:
        """Whether this version is not read yet and has held still for ``settle_s``."""
        if self._taken.get(path) == version:
            return False
        now = time.monotonic()
        held = self._pending.get(path)
        if held is None or held[0] != version:
            self._pending[path] = (version, now)
            return self.cfg.settle_s == 0
        return now - held[1] >= self.cfg.settle_s

    def _take(self, path: Path, version: _Version) -> bool:
        """Read and emit one settled version; False if the source is stopping."""
        self._taken[path] = version
        del self._pending[path]
        return self._pace() and self._emit(self._read(path, _watch_id(path.stem, version)))

    def _files(self) -> dict[Path, os.stat_result]:
        """The regular files whose names match, in name order; raises OSError if the folder cannot be listed."""
        files: dict[Path, os.stat_result] = {}
        skipped: dict[Path, str] = {}
        with os.scandir(self.folder) as entries:
            names = sorted(entry.name for entry in entries if self._matches(entry.name))
        for name in names:
            path = self.folder / name
            st_or_why = _regular_file(path)
            if isinstance(st_or_why, str):
                skipped[path] = st_or_why
            elif st_or_why is not None:
                files[path] = st_or_why
        self._note_skipped(skipped)
        return files

    def _note_skipped(self, skipped: dict[Path, str]) -> None:
        """Log and count each skipped path once while it stays: a watch lists it at every poll."""
        for path, why in skipped.items():
            if path not in self._skipping:
                self._stats.skipped += 1
                log.warning("source %s: skipping %s: %s", self.name, path, why)
        self._skipping = set(skipped)

    def _matches(self, name: str) -> bool:
        if self.cfg.pattern is not None:
            return fnmatch.fnmatchcase(name, self.cfg.pattern)
        return Path(name).suffix.lower() in IMAGE_SUFFIXES

    def _read(self, path: Path, frame_id: str) -> Frame:
        seq = self._seq
        self._seq += 1
        meta = {"path": str(path)}
        try:
            return Frame(frame_id, seq, self.name, read_image(path, self.cfg.max_pixels, self.cfg.grey), meta=meta)
        except Exception as e:  # whatever one file does ends as its own error frame, never the thread's end
            error = str(e) if isinstance(e, FrameError) else f"{path}: cannot read ({type(e).__name__}: {e})"
        log.warning("source %s: %s", self.name, error)
        return Frame(frame_id, seq, self.name, None, meta=meta, error=error)

    def _batch_id(self, stem: str) -> str:
        frame_id, n = stem, 1
        while frame_id in self._ids:
            n += 1
            frame_id = f"{stem}-{n}"
        self._ids.add(frame_id)
        return frame_id


def _watch_id(stem: str, version: _Version) -> str:
    """``{stem}-{h}``: the same for the same file in every run, new when the name holds new content."""
    size, mtime_ns, inode = version
    h = hashlib.blake2s(f"{size}:{mtime_ns}:{inode}".encode(), digest_size=4).hexdigest()
    return f"{stem}-{h}"


def _regular_file(path: Path) -> os.stat_result | str | None:
    """The stat of a regular file (links followed); else why it is skipped, or None if it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        # Gone since the listing (renamed, deleted) unless the link itself is still there.
        return "dangling symbolic link" if path.is_symlink() else None
    except OSError as e:
        return "symbolic link loop" if e.errno == errno.ELOOP else f"cannot stat ({e.strerror or e})"
    if stat.S_ISREG(st.st_mode):
        return st
    # A FIFO or device would block the read or never end: only regular files are read.
    return "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"


class VideoSource(FrameSource):
    """A video file, frame by frame; ends at EOF. A file that will not open gives one error frame
    and sets ``failure``."""

    def __init__(self, cfg: SourceConfig) -> None:
        if cfg.path is None or not Path(cfg.path).is_file():
            raise SourceError(f"source.path: video file not found: {cfg.path}")
        super().__init__(cfg, name=f"video-{Path(cfg.path).stem}", live=False)
        self.path = Path(cfg.path)

    def _produce(self) -> None:
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                self.failure = f"{self.path}: cannot open video (corrupt or unsupported codec)"
                frame_id, seq = self._next_id()
                self._emit(Frame(frame_id, seq, self.name, None, meta={"path": str(self.path)}, error=self.failure))
                return
            self._stats.connected = True
            while self._pace():
                pos = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
                ok, img = cap.read()
                if not ok or img is None:
                    return  # EOF
                frame = self._captured(img, f"{self.path} frame {pos}", {"path": str(self.path), "pos": pos})
                if not self._emit(frame):
                    return
        finally:
            cap.release()


class CaptureSource(FrameSource):
    """A device or stream that can go away: open, read until it fails, reopen with backoff."""

    def __init__(self, cfg: SourceConfig, name: str) -> None:
        super().__init__(cfg, name, live=True)

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
            if not self._emit(self._captured(img, self.name, {})):
                return


class CameraSource(CaptureSource):
    """A V4L2 camera by index (/dev/video<index>)."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg, name=f"camera{cfg.index}")

    def _open(self) -> cv2.VideoCapture:
        return cv2.VideoCapture(self.cfg.index, cv2.CAP_V4L2)


class StreamSource(CaptureSource):
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
    meta['defect'] its kind (None for a good part). Live when ``count`` is 0 (endless)."""

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg, name="synthetic", live=cfg.count == 0)
        self._rng = np.random.default_rng(cfg.seed)

    def _produce(self) -> None:
        self._stats.connected = True
        size = (int(self.cfg.size[0]), int(self.cfg.size[1]))
        while (self.cfg.count == 0 or self._seq < self.cfg.count) and self._pace():
            defect = None
            if self._rng.random() < self.cfg.defect_rate:
                defect = DEFECT_KINDS[self._rng.integers(len(DEFECT_KINDS))]
            img, mask = synthetic_part(self._rng, size, defect)
            if not self._emit(self._captured(img, self.name, {"mask": mask, "defect": defect})):
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
