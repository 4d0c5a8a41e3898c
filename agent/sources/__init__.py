"""Frame sources as plugins: each kind is one file here, with its own typed settings.

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

The ``source:`` section is one kind's settings (``kind: folder`` and the folder's keys, ...);
``SOURCES`` finds the kinds, ``open_source`` builds the configured one.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engines.plugins import Plugin, PluginSettings, Registry
from engines.settings import SettingError

__all__ = ["SOURCES", "SourceError", "SourceSettings", "open_source"]

SOURCES = Registry("agent.sources", "source")


class SourceError(ValueError):
    """A source that cannot be set up as configured (raised in the caller's thread, never the source's);
    the message starts with the key, e.g. ``source.url: ...``."""


class SourceSettings(PluginSettings):
    """What every kind of source has: delivery, frame bound, colour, reconnect backoff."""

    mode: Literal["triggered", "free"] = Field(
        "triggered", description="triggered: never drop, block the source | free: keep the newest frame, "
                                 "count drops")
    queue_size: int = Field(8, ge=1, description="triggered mode: frames buffered between source and inference")
    max_pixels: int = Field(50_000_000, ge=1024, description="largest frame accepted (width x height, read "
                                                             "from an image file's header before decoding); "
                                                             "larger frames give an error verdict. Image files are "
                                                             "also held to Pillow's decompression-bomb limit "
                                                             "(about 179 M pixels)")
    grey: bool = Field(False, description="deliver grey frames instead of BGR")
    reconnect_min_s: float = Field(0.5, gt=0.0, description="a live source's reconnect / restart backoff starts "
                                                            "here ...")
    reconnect_max_s: float = Field(30.0, gt=0.0, description="... and doubles up to here")

    @model_validator(mode="after")
    def _backoff(self) -> "SourceSettings":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise SettingError("reconnect_max_s", f"expected at least reconnect_min_s ({self.reconnect_min_s}), "
                                                  f"got {self.reconnect_max_s}")
        return self


def open_source(settings: SourceSettings) -> "FrameSource":
    """The source for ``settings``, checked but not started; raises SourceError naming what is wrong."""
    return SOURCES.load(settings.kind).SOURCE(settings)


def plugin(kind: str, settings: type[SourceSettings], module: str, summary: str) -> Plugin:
    import importlib

    return Plugin(kind, settings, lambda: importlib.import_module(module), summary)


from agent.sources.base import FrameSource  # noqa: E402  (the base the kinds share, for type hints)
