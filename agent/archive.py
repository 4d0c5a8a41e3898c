"""The NG archive: evidence of rejected parts on local disk, kept within an age and a size.

For every NG frame (and every ``every_ok``-th OK frame) one record of three files::

    <dir>/<YYYY-MM-DD>/<HH>/<frame_id>.png          the frame as inspected (lossless)
    <dir>/<YYYY-MM-DD>/<HH>/<frame_id>.overlay.jpg  the overlay (agent/overlay.py)
    <dir>/<YYYY-MM-DD>/<HH>/<frame_id>.json         the verdict (agent/verdict.schema.json)

Date and hour are the frame's time in UTC. In the file name, ``% / \\`` and NUL of the frame id are
percent-encoded, and a leading dot is (``%2E``). Each file is written under a temporary name and
renamed, the sidecar last: a sidecar means the record is complete.

Off the inference thread: ``publish`` only puts the inspection on a bounded queue (a record holds
its frame in memory); when the queue is full the record is dropped and counted, never waited
for. One writer thread encodes and writes, and enforces retention as it goes:

- by size: after each record, while the archive is over ``max_bytes``, the oldest records go
  (the oldest hour folder first, its records by modification time);
- by age: at start and every minute, hour folders whose hour ended more than ``max_age_days``
  ago are deleted whole.

The size is counted from what the writer finds at start (a scan in the writer thread) and what
it writes since; files others put in the hour folders count too.

Faults degrade, they never stop inspection: a record that cannot be written (disk full, a
read-only or vanished folder, an I/O error) is removed again, counted in ``failed``, and the
writer goes on with the next; one WARNING when failing begins, one INFO line when a record is
written again. The queue overflowing is logged once per episode too.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from agent import overlay
from agent.verdict import Inspection
from engines.settings import ConfigPath, Settings

__all__ = ["Archive", "ArchiveSettings", "ArchiveStats", "file_stem"]

log = logging.getLogger(__name__)

# A record's files; the sidecar last, so its presence means the record is complete.
_RECORD_SUFFIXES = (".png", ".overlay.jpg", ".json")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HOUR = re.compile(r"\d{2}")
_NAME_ESCAPES = {"%": "%25", "/": "%2F", "\\": "%5C", "\0": "%00"}
_AGE_CHECK_S = 60.0
_TMP_SUFFIX = ".tmp"


class ArchiveSettings(Settings):
    dir: ConfigPath | None = Field(None, description="archive folder: <dir>/<UTC date>/<hour>/<frame_id>.png, "
                                                     ".overlay.jpg, .json; null = no archive")
    every_ok: int = Field(0, ge=0, description="also archive every Nth OK frame; 0 = NG frames only")
    max_age_days: float = Field(30.0, gt=0.0, description="hour folders older than this are deleted")
    max_bytes: int = Field(10 * 2**30, ge=1, description="size bound (10 GiB); the oldest records are deleted "
                                                         "while the archive is larger")
    queue_size: int = Field(16, ge=1, description="records waiting for the writer thread (each holds its frame "
                                                  "in memory); when full, new records are dropped and counted")


@dataclass(frozen=True)
class ArchiveStats:
    written: int    # records written
    dropped: int    # records not queued (the writer was behind) or still queued at stop
    failed: int     # records that could not be written (disk full, read-only, I/O error)
    deleted: int    # records deleted by retention (age or size)
    queued: int     # records waiting for the writer
    bytes: int      # the archive's size as the writer counts it
    state: Literal["ok", "failing"]
    reason: str | None  # why failing
    since: float        # epoch seconds of the last change of state


@dataclass(frozen=True)
class _Failure:
    since: float  # monotonic
    failed: int   # the count when it began
    reason: str


def file_stem(frame_id: str) -> str:
    """A record's file name without suffix: the frame id, made safe as one file name."""
    stem = "".join(_NAME_ESCAPES.get(c, c) for c in frame_id)
    return "%2E" + stem[1:] if stem.startswith(".") else stem


class Archive:
    """The archive sink: ``start``, ``publish`` (never blocks, never raises), ``stop``, ``stats``."""

    def __init__(self, settings: ArchiveSettings, image_max_side: int) -> None:
        if settings.dir is None:
            raise ValueError("archive: no dir configured")
        self.settings = settings
        self.root = Path(settings.dir)
        self.image_max_side = image_max_side
        self._queue: queue.Queue[Inspection | None] = queue.Queue(maxsize=settings.queue_size)  # None: wake up
        self._ok_seen = 0          # inspection thread only
        self._overflowing = False  # inspection thread only
        self._written = self._dropped = self._failed = self._deleted = 0
        self._hours: dict[Path, int] = {}  # hour folder -> bytes; writer thread only, as below
        self._bytes = 0
        self._doomed: deque[list[Path]] = deque()  # records of the oldest hour folder, oldest first
        self._doomed_folder: Path | None = None
        self._failure: _Failure | None = None
        self._since = time.time()
        self._next_age_check = 0.0
        self._stop_at: float | None = None  # monotonic deadline, once stopping
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)

    def start(self) -> None:
        log.info("archive: NG frames%s to %s (at most %.3g days, %d bytes)",
                 f" and every {self.settings.every_ok}th OK frame" if self.settings.every_ok else "", self.root,
                 self.settings.max_age_days, self.settings.max_bytes)
        self._thread.start()

    def publish(self, inspection: Inspection) -> None:
        """Queue an NG (or every Nth OK) inspection for the writer; drop and count it when the queue is full."""
        status = inspection.verdict.status
        if status == "ok":
            self._ok_seen += 1
            if not self.settings.every_ok or self._ok_seen % self.settings.every_ok:
                return
        elif status != "ng":
            return
        try:
            self._queue.put_nowait(inspection)
        except queue.Full:
            self._dropped += 1
            if not self._overflowing:
                log.warning("archive: the writer is behind (%d records queued); records are dropped until it "
                            "catches up (%d so far)", self.settings.queue_size, self._dropped)
            self._overflowing = True
            return
        if self._overflowing:
            log.info("archive: the writer caught up; %d record(s) dropped so far", self._dropped)
        self._overflowing = False

    def stop(self, timeout_s: float) -> None:
        """Write what is queued for up to ``timeout_s``; what is left then is counted as dropped."""
        self._stop_at = time.monotonic() + timeout_s
        self._stopping.set()
        try:
            self._queue.put_nowait(None)  # an idle writer waits on the queue: wake it now
        except queue.Full:
            pass  # a full queue: the writer is busy, it sees the stop after this record
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s + 1.0)

    @property
    def stats(self) -> ArchiveStats:
        failure = self._failure
        return ArchiveStats(written=self._written, dropped=self._dropped, failed=self._failed,
                            deleted=self._deleted, queued=self._queue.qsize(), bytes=self._bytes,
                            state="ok" if failure is None else "failing",
                            reason=None if failure is None else failure.reason, since=self._since)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._scan()
            while True:
                if self._stopping.is_set() and (self._queue.empty() or time.monotonic() >= (self._stop_at or 0)):
                    break
                try:
                    inspection = self._queue.get(timeout=1.0)
                except queue.Empty:
                    inspection = None
                if inspection is not None:
                    self._write(inspection)
                    self._enforce_size()
                if time.monotonic() >= self._next_age_check:
                    self._expire()
        except Exception:  # a bug here must not take inspection down: the archive stops, the agent goes on
            log.exception("archive: writer failed; no more records are archived")
        left = self._drop_queued()
        if left:
            log.warning("archive: stopped with %d record(s) not written (counted as dropped)", left)

    def _drop_queued(self) -> int:
        dropped = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                self._dropped += dropped
                return dropped
            dropped += item is not None

    def _write(self, inspection: Inspection) -> None:
        verdict = inspection.verdict
        t = time.gmtime(verdict.timestamp)
        folder = self.root / time.strftime("%Y-%m-%d", t) / time.strftime("%H", t)
        stem = file_stem(verdict.frame_id)
        try:
            files = self._files(inspection)
        except Exception:  # a frame that cannot be encoded costs its record, not the writer
            log.exception("archive: frame %s: cannot encode its record", verdict.frame_id)
            self._failed += 1
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            replaced = sum(_size(folder / f"{stem}{suffix}") for suffix in _RECORD_SUFFIXES)
            written = 0
            for suffix, data in files:
                written += _write_atomically(folder / f"{stem}{suffix}", data)
        except OSError as e:
            self._remove_record(folder, stem)
            self._failing(e)
            self._failed += 1
            return
        self._hours[folder] = self._hours.get(folder, 0) + written - replaced
        self._bytes += written - replaced
        self._written += 1
        self._writing_again()

    def _files(self, inspection: Inspection) -> list[tuple[str, bytes]]:
        """The record's files, the sidecar last. An inspection without a frame image gets none of it."""
        files = []
        if inspection.image is not None:
            files.append((".png", _png(inspection)))
        image = overlay.render(inspection, "overlay", self.image_max_side)
        if image is not None:
            files.append((".overlay.jpg", overlay.encode(image, "jpeg")))
        files.append((".json", inspection.verdict.to_json().encode()))
        return files

    def _remove_record(self, folder: Path, stem: str) -> None:
        for suffix in _RECORD_SUFFIXES:
            for path in (folder / f"{stem}{suffix}", folder / f".{stem}{suffix}{_TMP_SUFFIX}"):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass  # a read-only folder: nothing was written there either

    # -- faults -------------------------------------------------------------------------------

    def _failing(self, error: OSError) -> None:
        """A write or delete failed: the start of an episode is logged, the rest of it is not."""
        if self._failure is not None:
            return
        reason = f"{error.strerror or error} ({error.filename})" if error.filename else str(error)
        self._failure = _Failure(time.monotonic(), self._failed, reason)
        self._since = time.time()
        log.warning("archive: cannot write: %s; frames are not archived until it works again (inspection goes on)",
                    reason)

    def _writing_again(self) -> None:
        failure = self._failure
        if failure is None:
            return
        self._failure = None
        self._since = time.time()
        log.info("archive: writing again after %.0f s; %d record(s) could not be archived meanwhile",
                 time.monotonic() - failure.since, self._failed - failure.failed)

    # -- retention ----------------------------------------------------------------------------

    def _scan(self) -> None:
        """The size of what is already archived, hour folder by hour folder; leftovers of a killed
        writer (temporary files) are removed."""
        try:
            dates = [d for d in self.root.iterdir() if d.is_dir() and _DATE.fullmatch(d.name)]
        except FileNotFoundError:
            return  # made at the first record
        except OSError as e:
            log.warning("archive: cannot list %s (%s); its size counts from what is written now", self.root,
                        e.strerror or e)
            return
        for date in dates:
            try:
                hours = [h for h in date.iterdir() if h.is_dir() and _HOUR.fullmatch(h.name)]
            except OSError:
                continue  # unreadable: not ours to count or delete
            for hour in hours:
                self._hours[hour] = _scan_hour(hour)
        self._bytes = sum(self._hours.values())
        log.info("archive: %d hour folder(s), %d bytes already in %s", len(self._hours), self._bytes, self.root)

    def _expire(self) -> None:
        self._next_age_check = time.monotonic() + _AGE_CHECK_S
        cutoff = time.time() - self.settings.max_age_days * 86400.0
        for folder in sorted(self._hours):
            if _hour_start(folder) + 3600.0 > cutoff:
                break  # sorted: every later folder is younger
            records = len(_records(folder))
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as e:
                self._failing(e)
                return
            self._deleted += records
            self._forget(folder)

    def _enforce_size(self) -> None:
        while self._bytes > self.settings.max_bytes and self._hours:
            folder = min(self._hours)
            if self._doomed_folder != folder or not self._doomed:
                self._doomed_folder, self._doomed = folder, deque(_records(folder))
            if not self._doomed:
                self._forget(folder)  # nothing of ours left in it
                continue
            if not self._delete(folder, self._doomed.popleft()):
                return

    def _delete(self, folder: Path, paths: list[Path]) -> bool:
        for path in paths:
            size = _size(path)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                self._failing(e)
                return False
            self._hours[folder] -= size
            self._bytes -= size
        self._deleted += 1
        return True

    def _forget(self, folder: Path) -> None:
        """Drop an hour folder from the count, and remove it (and its date folder) when empty."""
        self._bytes -= self._hours.pop(folder, 0)
        for empty in (folder, folder.parent):
            try:
                empty.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                return  # not empty: other files, or a record written meanwhile


def _records(folder: Path) -> list[list[Path]]:
    """A folder's records (each its files), oldest first by modification time."""
    grouped: dict[str, list[Path]] = {}
    try:
        paths = list(folder.iterdir())
    except OSError:
        return []
    for path in paths:
        stem = next((path.name[:-len(s)] for s in _RECORD_SUFFIXES if path.name.endswith(s)), None)
        if stem is not None:
            grouped.setdefault(stem, []).append(path)
    return sorted(grouped.values(), key=lambda files: min(_mtime(p) for p in files))


def _scan_hour(folder: Path) -> int:
    """The bytes in an hour folder; temporary files of a killed writer are removed."""
    size = 0
    try:
        for path in folder.iterdir():
            if path.name.startswith(".") and path.name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)
            else:
                size += _size(path)
    except OSError:
        pass  # read-only or unreadable: counted as far as it could be listed
    return size


def _hour_start(folder: Path) -> float:
    return datetime.strptime(f"{folder.parent.name} {folder.name}", "%Y-%m-%d %H").replace(
        tzinfo=timezone.utc).timestamp()


def _png(inspection: Inspection) -> bytes:
    ok, buf = cv2.imencode(".png", inspection.image)
    if not ok:
        raise OSError(f"encoding frame {inspection.verdict.frame_id} as PNG failed")
    return buf.tobytes()


def _write_atomically(path: Path, data: bytes) -> int:
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
