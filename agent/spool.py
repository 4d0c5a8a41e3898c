"""The on-disk store-and-forward spool between the inspection loop and the MQTT broker.

Every verdict and heatmap is written here first and deleted only when the broker has
acknowledged it (PUBACK), so a broker outage or a killed process loses nothing that fits
in the spool. Items come back out in insertion order.

Storage: one SQLite file in WAL mode with ``synchronous=NORMAL``: a committed ``put``
survives a killed process (the test kills with SIGKILL); the last few writes before a
power cut may not. One table, ``spool(seq, topic, payload, qos, retain, kind, created)``.

Policy when full (``max_messages`` items or ``max_bytes`` of payload, whichever comes
first): ``put`` never blocks and never fails for lack of room. It makes room by dropping
the oldest heatmaps first, then the oldest of everything else (verdicts), one at a time,
until the spool fits again; the new item itself may be dropped if it alone is too large.
Every dropped item is counted in ``dropped`` and logged (once per overflow episode), so
the loss is visible in the health payload instead of silent.

Thread-safe: the inspection thread puts, the MQTT threads read and ack; one connection,
guarded by a lock.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Dropped first when the spool is full: a verdict without its heatmap still tells the
# line what to do; a heatmap without its verdict is useless.
DROP_FIRST_KIND = "heatmap"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    created REAL    NOT NULL
)
"""


@dataclass(frozen=True)
class SpoolItem:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    created: float


def check_spool_path(path: Path) -> None:
    """Refuse a spool path that cannot work at all (a SettingError for ``spool_path``): it is a
    directory, or its folder cannot be made or written. Creates nothing."""
    from engines.settings import SettingError

    path = Path(path)
    if path.is_dir():
        raise SettingError("spool_path", f"{path} is a directory; give a file path (e.g. {path}/spool.sqlite)")
    if path.exists():
        if not path.is_file():
            raise SettingError("spool_path", f"{path} is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise SettingError("spool_path", f"{path}: not readable and writable by this user")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise SettingError("spool_path", f"{folder} is not a directory, so the spool's folder {path.parent} "
                                         "cannot be made")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SettingError("spool_path", f"{folder} is not writable by this user, so the spool cannot be made")


class Spool:
    def __init__(self, path: Path, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1:
            raise ValueError(f"spool max_messages must be at least 1, got {max_messages}")
        if max_bytes < 1:
            raise ValueError(f"spool max_bytes must be at least 1, got {max_bytes}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        self._overflowing = False
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, each statement is its own transaction.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._reload_totals()
        except (sqlite3.Error, OSError) as e:
            raise OSError(f"spool {self.path}: cannot open: {e}") from e
        if self._count:
            log.info("spool %s: %d item(s) from a previous run to deliver", self.path, self._count)

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
            kind: str = "verdict") -> int:
        """Store one message; returns its sequence number (may already be dropped if too large)."""
        payload = bytes(payload)
        with self._lock:
            with self._transaction():  # insert and make room together, or neither
                cur = self._db.execute(
                    "INSERT INTO spool (topic, payload, qos, retain, kind, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (topic, payload, int(qos), int(bool(retain)), kind, time.time()))
                self._count += 1
                self._bytes += len(payload)
                dropped_now = self._make_room()
            self._log_overflow(dropped_now)
            return int(cur.lastrowid)

    def pending(self, limit: int, after_seq: int = 0) -> list[SpoolItem]:
        """Up to ``limit`` undelivered items with ``seq > after_seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain, kind, created FROM spool "
                "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        return [SpoolItem(seq, topic, bytes(payload), qos, bool(retain), kind, created)
                for seq, topic, payload, qos, retain, kind, created in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered items; returns how many were still there (dropped ones are not)."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            marks = ",".join("?" * len(ids))
            with self._transaction():
                removed, nbytes = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool WHERE seq IN ({marks})",
                    ids).fetchone()
                self._db.execute(f"DELETE FROM spool WHERE seq IN ({marks})", ids)
            self._count -= removed
            self._bytes -= nbytes
            return int(removed)

    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def nbytes(self) -> int:
        """Payload bytes waiting in the spool."""
        with self._lock:
            return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # Explicit: the connection is in autocommit mode, so ``with self._db`` would not BEGIN.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._reload_totals()
            raise
        self._db.execute("COMMIT")

    def _reload_totals(self) -> None:
        count, nbytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()
        self._count, self._bytes = int(count), int(nbytes)

    def _make_room(self) -> int:
        dropped = 0
        while self._count > self.max_messages or self._bytes > self.max_bytes:
            row = self._db.execute(
                "SELECT seq, LENGTH(payload) FROM spool WHERE kind = ? ORDER BY seq LIMIT 1",
                (DROP_FIRST_KIND,)).fetchone()
            if row is None:
                row = self._db.execute("SELECT seq, LENGTH(payload) FROM spool ORDER BY seq LIMIT 1").fetchone()
            seq, nbytes = row
            self._db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            self._count -= 1
            self._bytes -= nbytes
            dropped += 1
        self.dropped += dropped
        return dropped

    def _log_overflow(self, dropped_now: int) -> None:
        # Once per episode: a long outage would otherwise log every frame.
        if dropped_now and not self._overflowing:
            log.warning("spool %s full (%d messages / %d bytes max): dropping oldest heatmaps, then "
                        "oldest verdicts; %d dropped so far", self.path, self.max_messages,
                        self.max_bytes, self.dropped)
        self._overflowing = bool(dropped_now)
