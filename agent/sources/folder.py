"""``folder``: image files in a folder, read once in name order (batch) or watched for new ones."""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from agent.decode import FrameError, read_image
from agent.frames import Frame
from agent.sources import SourceError, SourceSettings, plugin
from agent.sources.base import FrameSource
from calibration.data import IMAGE_SUFFIXES
from engines.settings import ConfigPath

log = logging.getLogger("agent.sources")


class FolderSettings(SourceSettings):
    kind: Literal["folder"] = "folder"
    path: ConfigPath | None = Field(None, description="the folder of images")
    watch: bool = Field(False, description="keep watching for new files (each version of a file once); a watched "
                                           "folder is a live source")
    pattern: str | None = Field(None, description="file-name glob (fnmatch, case-sensitive); null = image files by "
                                                  "suffix")
    poll_s: float = Field(0.5, gt=0.0, description="watch: rescan interval, seconds")
    settle_s: float = Field(1.0, ge=0.0, description="watch: a file is taken once its size and mtime held still "
                                                     "this long; 0 = at first sight (writers that rename complete "
                                                     "files into the folder)")
    fps: float = Field(0.0, ge=0.0, description="pacing; 0 = as fast as inference takes the frames")


# A watched file's version: (size, mtime_ns, inode).
_Version = tuple[int, int, int]


class FolderSource(FrameSource):
    """Image files in a folder, in name order. Batch mode ends after the last file; watch mode
    keeps listing the folder and reads each version of a file once, when it has stopped changing."""

    def __init__(self, cfg: FolderSettings) -> None:
        if cfg.path is None or not Path(cfg.path).is_dir():
            raise SourceError(f"source.path: not a folder: {cfg.path}")
        super().__init__(cfg, name=f"folder-{Path(cfg.path).name}", live=cfg.watch, fps=cfg.fps)
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
                # Logged before counted: whoever sees the count also finds the line.
                log.warning("source %s: skipping %s: %s", self.name, path, why)
                self._stats.skipped += 1
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



PLUGINS = [plugin("folder", FolderSettings, "agent.sources.folder",
                  "image files in a folder, once (batch) or watched for new ones (live)")]
SOURCE = FolderSource
