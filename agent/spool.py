"""The on-disk store-and-forward spool between the inspection loop and the MQTT broker.

Every verdict and image is written here first and deleted only when the broker has
acknowledged it (PUBACK), so a broker outage or a killed process loses nothing that fits
in the spool. Items come back out in insertion order. ``put_many`` writes several messages
(a verdict and its images) in one transaction: a kill never leaves one without the other.
A retained message replaces the older ones on its topic that are still waiting: the broker
keeps only the newest, so the older ones would only be sent to be overwritten.

Storage: one SQLite file in WAL mode with ``synchronous=NORMAL``: a committed write survives
a killed process (the tests kill with SIGKILL); the last few writes before a power cut may
not. One table, ``spool(seq, topic, payload, qos, retain, kind, created, user_properties)``
(MQTT 5 user properties as a JSON list of pairs; a file of the layout before that column is
given it when opened). Sequence numbers never repeat within a process, not even in a fresh file
that replaced a damaged one.

Policy when full (``max_messages`` items or ``max_bytes`` of payload, whichever comes
first): a write never blocks and never fails for lack of room in the spool. It makes room
by dropping the oldest images (anything but a verdict) first, then the oldest verdicts, one at
a time, until the spool fits again; the new item itself may be dropped if it alone is too
large.
Every dropped item is counted in ``dropped`` (once its transaction has committed) and
logged (once per overflow episode), so the loss is visible in the health payload.

Faults degrade, they do not crash:

- A write that fails (disk full, I/O error: any ``sqlite3.Error`` but damage) is rolled
  back whole, leaves the counts as they were, is counted in ``write_errors`` and raises
  ``SpoolWriteError``. Nothing is retried here; the next write simply works once there is
  room again.
- A damaged file (not a database, malformed, or tables that are not the spool's), found at
  open (SQLite's ``quick_check`` reads the whole file once) or by any later read or write,
  is moved aside to ``<name>.damaged-<UTC
  yyyymmddTHHMMSS>`` (its ``-wal`` and ``-shm`` with it), logged, counted in
  ``quarantined``, and a fresh spool takes its place; what was waiting in it stays in the
  moved file, undelivered. A path that cannot hold a spool at all (a directory, no
  permission) raises OSError from the constructor.
- An acknowledged item whose DELETE fails (in WAL mode a delete needs disk space too) is
  remembered in memory as delivered: ``pending`` skips it, ``len`` does not count it, and
  the delete is retried by every later ``ack`` and write.

Thread-safe: the inspection thread puts, the MQTT threads read and ack; one connection,
guarded by a lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

__all__ = ["KEPT_LONGEST_KIND", "Message", "Spool", "SpoolItem", "SpoolWriteError", "check_spool_path"]

log = logging.getLogger(__name__)

# When the spool is full everything else goes first: a verdict without its image still tells
# the line what to do; an image without its verdict is useless.
KEPT_LONGEST_KIND = "verdict"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    created REAL    NOT NULL,
    user_properties TEXT NOT NULL DEFAULT '[]'
)
"""
_COLUMNS = ["seq", "topic", "payload", "qos", "retain", "kind", "created", "user_properties"]
_COLUMNS_BEFORE_PROPERTIES = _COLUMNS[:-1]
_DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# SQLite's limit on "?" in one statement is 32766; deletes of remembered items go in chunks.
_CHUNK = 500

_T = TypeVar("_T")


@dataclass(frozen=True)
class Message:
    """What a writer hands to the spool."""
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    kind: str = "verdict"
    user_properties: tuple[tuple[str, str], ...] = ()  # MQTT 5 user properties, in order


@dataclass(frozen=True, kw_only=True)
class SpoolItem(Message):
    """A stored message, with its place in the spool and the time it was written."""
    seq: int
    created: float


class SpoolWriteError(Exception):
    """A write was rolled back: none of its messages is in the spool."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"spool {path}: cannot write: {reason}")
        self.path = path
        self.reason = reason


class _Damage(sqlite3.DatabaseError):
    """The file is a database, but not a spool (foreign tables, another layout)."""


@dataclass
class _Totals:
    count: int = 0   # items waiting (delivered ones whose delete failed are not)
    nbytes: int = 0  # their payload bytes


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
        self.dropped = 0        # by the full spool's policy
        self.quarantined = 0    # damaged files moved aside
        self.write_errors = 0   # writes rolled back (SpoolWriteError)
        self._totals = _Totals()
        self._delivered: set[int] = set()  # acknowledged, but the DELETE failed
        self._last_seq = 0
        self._overflowing = False
        self._deletes_failing = False
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # None only after a failed (re)open
        try:
            self._open()
        except OSError as e:
            if not _full_or_io(e):
                raise
            # A full or failing disk at start is a fault to live with: writes fail (and go around
            # the spool) until one can open the file.
            self.write_errors += 1
            log.warning("%s; starting without it, it is opened again at the next write", e)
        if self._totals.count:
            log.info("spool %s: %d item(s) from a previous run to deliver", self.path, self._totals.count)

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
            kind: str = "verdict") -> int:
        """Store one message; returns its sequence number (may already be dropped if too large)."""
        return self.put_many([Message(topic, payload, qos, retain, kind)])[0]

    def put_many(self, messages: Sequence[Message]) -> list[int]:
        """Store messages in one transaction, all or none; returns their sequence numbers.

        Raises SpoolWriteError when the write was rolled back (disk full, I/O error)."""
        messages = [replace(m, payload=bytes(m.payload)) for m in messages]
        with self._lock:
            try:
                seqs, dropped_now = self._guarded(lambda: self._insert(messages))
            except (sqlite3.Error, OSError) as e:
                self.write_errors += 1
                raise SpoolWriteError(self.path, self._describe(e)) from e
            self._log_overflow(dropped_now)
            return seqs

    def pending(self, limit: int, after_seq: int = 0) -> list[SpoolItem]:
        """Up to ``limit`` undelivered items with ``seq > after_seq``, oldest first."""
        with self._lock:
            # Delivered items still in the file are skipped, so ask for that many more rows.
            skip = sum(1 for seq in self._delivered if seq > after_seq)
            rows = self._guarded(lambda: self._connection().execute(
                "SELECT seq, topic, payload, qos, retain, kind, created, user_properties FROM spool "
                "WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit + skip)).fetchall())
            rows = [row for row in rows if row[0] not in self._delivered][:limit]
        return [SpoolItem(seq=seq, topic=topic, payload=bytes(payload), qos=qos, retain=bool(retain), kind=kind,
                          created=created, user_properties=tuple((str(k), str(v)) for k, v in json.loads(props)))
                for seq, topic, payload, qos, retain, kind, created, props in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered items; returns how many were still waiting (dropped ones are not).

        Never fails for lack of disk space: an item whose delete fails counts as delivered
        and its delete is retried by the next ``ack`` (an empty one too) or write."""
        with self._lock:
            fresh = [seq for seq in dict.fromkeys(ids) if seq not in self._delivered]
            # A read: works on a full disk, where the delete below may not.
            sizes = self._guarded(lambda: self._sizes(fresh)) if fresh else {}
            self._totals.count -= len(sizes)
            self._totals.nbytes -= sum(sizes.values())
            self._delivered.update(sizes)
            if self._delivered:
                self._delete_delivered()
            return len(sizes)

    def __len__(self) -> int:
        with self._lock:
            return self._totals.count

    @property
    def nbytes(self) -> int:
        """Payload bytes waiting in the spool."""
        with self._lock:
            return self._totals.nbytes

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()

    # -- writing ---------------------------------------------------------------------

    def _insert(self, messages: list[Message]) -> tuple[list[int], int]:
        db = self._connection()
        totals = replace(self._totals)  # made true only by the COMMIT
        with self._transaction(db):  # deletes owed, inserts and room-making together, or none
            self._delete_rows(db, self._delivered)
            seqs = [self._insert_one(db, m) for m in messages]
            totals.count += len(messages)
            totals.nbytes += sum(len(m.payload) for m in messages)
            for m, seq in zip(messages, seqs):
                if m.retain:
                    self._supersede(db, m.topic, seq, totals)
            dropped = self._make_room(db, totals)
        self._totals = totals
        self.dropped += dropped
        self._last_seq = max([self._last_seq, *seqs])
        self._delivered_deleted()
        return seqs, dropped

    @staticmethod
    def _insert_one(db: sqlite3.Connection, m: Message) -> int:
        cur = db.execute("INSERT INTO spool (topic, payload, qos, retain, kind, created, user_properties) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (m.topic, m.payload, m.qos, int(m.retain), m.kind,
                                                           time.time(), json.dumps(m.user_properties)))
        return int(cur.lastrowid or 0)

    @staticmethod
    def _supersede(db: sqlite3.Connection, topic: str, seq: int, totals: _Totals) -> None:
        """Delete the retained messages on ``topic`` older than ``seq``. One already handed to the
        broker is delivered all the same; its acknowledgement then finds nothing to delete."""
        old = db.execute("SELECT seq, LENGTH(payload) FROM spool WHERE topic = ? AND retain = 1 AND seq < ?",
                         (topic, seq)).fetchall()
        for old_seq, nbytes in old:
            db.execute("DELETE FROM spool WHERE seq = ?", (old_seq,))
            totals.count -= 1
            totals.nbytes -= nbytes

    def _make_room(self, db: sqlite3.Connection, totals: _Totals) -> int:
        dropped = 0
        while totals.count > self.max_messages or totals.nbytes > self.max_bytes:
            row = db.execute("SELECT seq, LENGTH(payload) FROM spool WHERE kind != ? ORDER BY seq LIMIT 1",
                             (KEPT_LONGEST_KIND,)).fetchone()
            if row is None:
                row = db.execute("SELECT seq, LENGTH(payload) FROM spool ORDER BY seq LIMIT 1").fetchone()
            seq, nbytes = row
            db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            totals.count -= 1
            totals.nbytes -= nbytes
            dropped += 1
        return dropped

    def _log_overflow(self, dropped_now: int) -> None:
        # Once per episode: a long outage would otherwise log every frame.
        if dropped_now and not self._overflowing:
            log.warning("spool %s full (%d messages / %d bytes max): dropping oldest images, then "
                        "oldest verdicts; %d dropped so far", self.path, self.max_messages,
                        self.max_bytes, self.dropped)
        self._overflowing = bool(dropped_now)

    # -- acknowledging ---------------------------------------------------------------

    def _sizes(self, seqs: list[int]) -> dict[int, int]:
        marks = ",".join("?" * len(seqs))
        rows = self._connection().execute(f"SELECT seq, LENGTH(payload) FROM spool WHERE seq IN ({marks})", seqs)
        return dict(rows.fetchall())

    def _delete_delivered(self) -> None:
        def delete() -> None:
            db = self._connection()
            with self._transaction(db):
                self._delete_rows(db, self._delivered)

        try:
            self._guarded(delete)
        except (sqlite3.Error, OSError) as e:
            if not self._deletes_failing:
                log.warning("spool %s: cannot delete delivered items (%s); they are skipped and deleted "
                            "once the disk allows", self.path, self._describe(e))
            self._deletes_failing = True
            return
        self._delivered_deleted()

    def _delivered_deleted(self) -> None:
        if self._deletes_failing:
            log.info("spool %s: delivered items deleted again", self.path)
        self._deletes_failing = False
        self._delivered.clear()

    @staticmethod
    def _delete_rows(db: sqlite3.Connection, seqs: set[int]) -> None:
        ordered = sorted(seqs)
        for start in range(0, len(ordered), _CHUNK):
            chunk = ordered[start:start + _CHUNK]
            db.execute(f"DELETE FROM spool WHERE seq IN ({','.join('?' * len(chunk))})", chunk)

    # -- the file: opening, damage, transactions --------------------------------------

    def _open(self) -> None:
        """Open or create the file, moving a damaged one aside first; OSError when the path cannot
        hold a spool."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                _check_is_spool(db)
            except sqlite3.DatabaseError as e:
                if not _is_damage(e):
                    db.close()
                    raise
                self._move_aside(db, e)
                db = self._connect()
            self._prepare(db)
            self._db = db
        except (sqlite3.Error, OSError) as e:
            raise OSError(f"spool {self.path}: cannot open: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; writes use explicit transactions (_transaction).
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)

    def _prepare(self, db: sqlite3.Connection) -> None:
        """WAL mode, the table, the numbering and the totals; closes the connection on failure."""
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            if _columns(db) == _COLUMNS_BEFORE_PROPERTIES:
                db.execute("ALTER TABLE spool ADD COLUMN user_properties TEXT NOT NULL DEFAULT '[]'")
            self._continue_numbering(db)
            count, nbytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()
        except BaseException:
            db.close()
            raise
        self._totals = _Totals(int(count), int(nbytes))

    def _continue_numbering(self, db: sqlite3.Connection) -> None:
        # A fresh file after a damaged one goes on from the last number this process gave
        # out: an ack for an item of the old file can then never delete one of the new.
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        if row is None and self._last_seq:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('spool', ?)", (self._last_seq,))
        self._last_seq = max(self._last_seq, row[0] if row else 0)

    def _guarded(self, operation: Callable[[], _T]) -> _T:
        """Run a read or write (the caller holds the lock); when it finds the file damaged, move the
        file aside and run it once more on a fresh spool."""
        if self._db is None:
            self._open()
        try:
            return operation()
        except sqlite3.DatabaseError as e:
            if not _is_damage(e):
                raise
            self._replace_damaged(e)
            return operation()

    def _replace_damaged(self, error: sqlite3.DatabaseError) -> None:
        waiting = self._totals.count
        db = self._connection()
        self._db = None
        self._delivered.clear()
        self._totals = _Totals()
        self._move_aside(db, error, waiting)
        self._open()

    def _move_aside(self, db: sqlite3.Connection, error: BaseException, waiting: int | None = None) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = _free_name(self.path.with_name(f"{self.path.name}.damaged-{stamp}"))
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(f"{target}{suffix}")
        finally:
            # Closed only after the renames: closing first would let SQLite fold the -wal into
            # the damaged file and delete it, and the -wal is part of what to look at.
            db.close()
        self.quarantined += 1
        left = "" if waiting is None else f"; the {waiting} item(s) waiting in it are not delivered"
        log.warning("spool %s is damaged (%s): moved it aside to %s and started a fresh spool%s",
                    self.path, error, target, left)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:  # _guarded reopens before any operation runs
            raise sqlite3.OperationalError(f"spool {self.path} is not open")
        return self._db

    @contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[None]:
        # Explicit: the connection is in autocommit mode, so ``with db`` would not BEGIN.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a COMMIT that failed on a full disk may have rolled back already
                db.execute("ROLLBACK")
            raise

    def _describe(self, error: BaseException) -> str:
        """The error, SQLite's name for it, and the free space where the spool lives."""
        name = getattr(error, "sqlite_errorname", None)
        try:
            free = f"{shutil.disk_usage(self.path.parent).free} bytes free in {self.path.parent}"
        except OSError:
            free = f"{self.path.parent} unreadable"
        return f"{error} ({name + '; ' if name else ''}{free})"


def _check_is_spool(db: sqlite3.Connection) -> None:
    """Raise unless the file is empty or holds the spool table (and SQLite's own sequence table).
    Garbage raises SQLite's own "file is not a database" here, malformed pages the check's
    findings."""
    findings = [row[0] for row in db.execute("PRAGMA quick_check")]
    if findings != ["ok"]:
        raise _Damage("malformed: " + "; ".join(findings[:3]))
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return
    columns = _columns(db)
    if tables - {"sqlite_sequence"} != {"spool"} or columns not in (_COLUMNS, _COLUMNS_BEFORE_PROPERTIES):
        raise _Damage(f"not a spool: tables {sorted(tables)}, spool columns {columns}")


def _columns(db: sqlite3.Connection) -> list[str]:
    return [row[1] for row in db.execute("PRAGMA table_info(spool)")]


def _full_or_io(error: BaseException) -> bool:
    """A disk that is full or failing now, as opposed to a path that can never hold a spool."""
    cause = error.__cause__ if isinstance(error.__cause__, sqlite3.Error) else error
    code = getattr(cause, "sqlite_errorcode", None)
    return (code is not None and (code & 0xFF) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)) or \
        getattr(error, "errno", None) in (errno.ENOSPC, errno.EIO)


def _is_damage(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, _Damage) or (code is not None and (code & 0xFF) in _DAMAGE_CODES)


def _free_name(path: Path) -> Path:
    # Two files damaged within the same second must not overwrite each other.
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
