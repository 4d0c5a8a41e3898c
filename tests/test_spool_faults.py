"""The spool under faults: a real full filesystem (a small tmpfs), damaged files at open and at run
time. The spool degrades, the publisher goes on, and both recover by themselves."""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt import image_root, image_topic
from agent.spool import Message, Spool, SpoolWriteError

from conftest import fill
from mqtt_client import PREFIX, wait_until
from test_mqtt import config, make_inspection, publishers, verdict_only  # noqa: F401  (fixture)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs) to fill up; skipped where mounting is not permitted."""
    if os.geteuid() != 0:
        pytest.skip("a full filesystem needs a small tmpfs, and mounting one needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        # Lazy: a test that failed half-way may still hold the spool open.
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def rows(path: Path) -> int:
    """Rows in the spool file, as another reader sees them."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]


def overwrite_pages(path: Path) -> None:
    """Damage every page but the first, even under an open spool: its page cache is dropped
    because another connection writes after the damage."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        with open(path, "r+b") as f:
            f.seek(page_size)
            f.write(b"\xa5" * (path.stat().st_size - page_size))
        db.execute("PRAGMA user_version = 1")  # touches only the first page


def moved_aside(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if re.fullmatch(re.escape(path.name) + r"\.damaged-\d{8}T\d{6}",
                                                                   p.name))


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- a full disk ------------------------------------------------------------------------


def test_a_write_on_a_full_disk_rolls_back_and_the_next_one_works(small_disk: Path) -> None:
    path = small_disk / "spool.sqlite"
    spool = Spool(path, max_messages=2, max_bytes=1 << 20)
    spool.put("t/verdict", b"v0")
    filler = fill(small_disk)

    pair = [Message("t/verdict", b"v1"), Message("t/image/1", b"h1", kind="image")]
    with pytest.raises(SpoolWriteError, match=f"spool {path}: cannot write: database or disk is full"):
        spool.put_many(pair)  # would have dropped v0 to make room: that is rolled back too
    assert len(spool) == 1 and spool.nbytes == 2 and spool.dropped == 0 and spool.write_errors == 1
    assert [i.payload for i in spool.pending(10)] == [b"v0"] and rows(path) == 1

    filler.unlink()
    spool.put_many(pair)
    assert [i.payload for i in spool.pending(10)] == [b"v0", b"v1"]  # room made: the image went
    assert spool.dropped == 1 and len(spool) == rows(path) == 2
    spool.close()


def test_an_ack_on_a_full_disk_keeps_the_items_out_and_deletes_them_later(
        small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = small_disk / "spool.sqlite"
    spool = Spool(path, max_messages=100, max_bytes=1 << 20)
    seqs = [spool.put("t/verdict", b"v%d" % i) for i in range(4)]
    filler = fill(small_disk)

    assert spool.ack(seqs[:2]) == 2  # delivered; the DELETE could not be written
    assert rows(path) == 4
    assert len(spool) == 2 and spool.nbytes == 4  # but they are not waiting
    assert [i.seq for i in spool.pending(10)] == seqs[2:]
    assert spool.ack(seqs[:2]) == 0 and len(spool) == 2  # acking again changes nothing
    assert spool.ack([]) == 0  # a retry, still failing: one warning all the same
    assert len([w for w in warnings(caplog) if "cannot delete delivered items" in w]) == 1

    filler.unlink()
    spool.put("t/verdict", b"v4")  # a write also deletes what is owed
    assert rows(path) == len(spool) == 3
    assert [i.payload for i in spool.pending(10)] == [b"v2", b"v3", b"v4"]
    spool.close()


def test_on_a_full_disk_verdicts_go_direct_or_wait_in_memory_then_the_spool_recovers(
        small_disk: Path, mosquitto: Any, subscribers: Any, publishers: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.mqtt")
    path = small_disk / "spool.sqlite"
    cfg = config(mosquitto, tmp_path, spool_path=path, images="all", last_ng="none")
    live = subscribers(mosquitto, image_prefix=image_root(cfg))  # MQTT 5: sees the properties
    plc = subscribers(mosquitto, protocol=mqtt.MQTTv311, client_id="plc", persistent=True)  # across restarts
    pub = publishers(cfg)
    pub.publish(verdict_only(0))
    wait_until(lambda: pub.stats.acked == 1 and rows(path) == 0, "the first verdict delivered and deleted")
    filler = fill(small_disk)

    # Broker up: straight to it, verdict then image, same QoS and properties.
    for i in range(1, 4):
        pub.publish(make_inspection(i))
    live.wait_for(lambda: len(live.verdict_ids()) == 4 and len(image_ids(live, cfg)) == 3, "direct verdicts")
    delivered = [m for m in live.messages if m.topic != f"{PREFIX}/status"]
    assert [json.loads(m.payload)["frame_id"] if m.topic == f"{PREFIX}/verdict" else m.topic for m in delivered] == [
        "f00000", "f00001", image_topic(cfg, "ok", "f00001"), "f00002", image_topic(cfg, "ok", "f00002"),
        "f00003", image_topic(cfg, "ng", "f00003")]
    for m in delivered:
        assert m.qos == 1 and not m.retain
        if m.topic.startswith(image_root(cfg)):
            assert m.properties.ContentType == "image/png"
            assert m.properties.CorrelationData == m.topic.rsplit("/", 1)[1].encode()
            assert dict(m.properties.UserProperty)["frame_id"] == m.topic.rsplit("/", 1)[1]
        else:
            assert m.properties.ContentType == "application/json"
    stats = pub.stats
    assert stats.direct == 3 and stats.lost == 0 and stats.spool_errors == 3 and stats.spooled == 0

    # Broker down as well: they wait in memory, inspection goes on.
    mosquitto.stop()
    wait_until(lambda: not pub.stats.connected, "the publisher to notice the outage")
    pub.publish(make_inspection(4))
    pub.publish(verdict_only(5))
    stats = pub.stats
    assert stats.direct == 3 and stats.held == 2 and stats.lost == 0 and stats.spool_errors == 5

    # Space back: the next write simply works; all are delivered when the broker returns.
    filler.unlink()
    pub.publish(verdict_only(6))
    assert pub.stats.spooled == 1 and pub.stats.spool_errors == 5
    mosquitto.start()
    plc.wait_for(lambda: {"f00004", "f00005", "f00006"} <= set(plc.verdict_ids()), "the held and spooled verdicts")
    # At least once: a message in flight when the broker stopped is sent again; held ones may
    # overtake spooled ones (the spool had failed, order is best effort then).
    assert set(plc.verdict_ids()) == {f"f{i:05d}" for i in range(7)}
    assert pub.stats.held == 0 and pub.stats.direct == 5 and pub.stats.lost == 0

    spool_lines = [w for w in warnings(caplog) if "spool" in w and "MQTT: lost" not in w]
    assert len(spool_lines) == 1, spool_lines  # one when it began; the end is INFO when nothing was lost
    assert spool_lines[0].startswith(f"MQTT: spool {path}: cannot write: database or disk is full")
    ended = [r.getMessage() for r in caplog.records if "writable again" in r.getMessage()]
    assert len(ended) == 1 and re.search(r"meanwhile 3 verdict\(s\) went directly to the broker and 0 were lost",
                                         ended[0])


def test_what_memory_cannot_hold_is_counted_lost(small_disk: Path, mosquitto: Any, publishers: Any,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.mqtt

    monkeypatch.setattr(agent.mqtt, "HELD_MAX_BYTES", 1)  # room for one verdict at a time
    mosquitto.stop()
    pub = publishers(config(mosquitto, tmp_path, spool_path=small_disk / "spool.sqlite"))
    fill(small_disk)
    for i in range(4):
        pub.publish(verdict_only(i))
    assert pub.stats.held == 0 and pub.stats.lost == 4  # each alone is over the bound



def test_failed_deletes_after_delivery_neither_resend_nor_crash(
        small_disk: Path, mosquitto: Any, subscribers: Any, publishers: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path = small_disk / "spool.sqlite"
    plc = subscribers(mosquitto, protocol=mqtt.MQTTv311, client_id="plc", persistent=True)
    pub = publishers(config(mosquitto, tmp_path, spool_path=path))
    wait_until(lambda: pub.stats.connected, "connection")
    mosquitto.stop()
    wait_until(lambda: not pub.stats.connected, "the publisher to notice the outage")
    for i in range(5):
        pub.publish(verdict_only(i))
    filler = fill(small_disk)
    mosquitto.start()

    wait_until(lambda: pub.stats.acked == 5 and pub.stats.spooled == 0, "the acknowledgements")
    assert rows(path) == 5 and pub.spool.pending(10) == []  # delivered, not deleted, not waiting
    pub.publish(verdict_only(99))  # the disk is still full: straight to the broker
    plc.wait_for(lambda: "f00099" in plc.verdict_ids(), "the verdict after them")
    assert plc.verdict_ids() == [f"f{i:05d}" for i in range(5)] + ["f00099"]  # nothing twice
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    filler.unlink()
    wait_until(lambda: rows(path) == 0, "the deletes, retried once there is room")
    assert pub.stats.spooled == 0 and pub.stats.acked == 5


def image_ids(sub: Any, cfg: Any) -> list[str]:
    return [m.topic.rsplit("/", 1)[1] for m in sub.under(image_root(cfg))]


# -- damaged files ----------------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database " * 200)
    Path(f"{path}-wal").write_bytes(b"nor is this a log")
    Path(f"{path}-shm").write_bytes(bytes(32768))


def _foreign_tables(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE readings (t REAL, value REAL)")
        db.commit()


def _old_layout(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE spool (id INTEGER PRIMARY KEY, body BLOB)")
        db.commit()


def _malformed(path: Path) -> None:
    spool = Spool(path, max_messages=1000, max_bytes=1 << 20)
    for i in range(50):
        spool.put("t/verdict", b"v%d" % i)
    spool.close()
    overwrite_pages(path)


@pytest.mark.parametrize("damage", [_garbage, _foreign_tables, _old_layout, _malformed])
def test_a_damaged_file_at_open_is_moved_aside_for_a_fresh_spool(
        tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.sqlite"
    damage(path)
    before = {suffix: Path(f"{path}{suffix}").read_bytes() for suffix in ("", "-wal")
              if Path(f"{path}{suffix}").exists()}

    spool = Spool(path, max_messages=100, max_bytes=1 << 20)
    (moved,) = moved_aside(path)
    stamp = datetime.strptime(moved.name.rsplit("-", 1)[1], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 120  # UTC, now
    assert moved.read_bytes() == before[""]  # moved, not changed
    if "-wal" in before:
        assert Path(f"{moved}-wal").read_bytes() == before["-wal"]
        assert Path(f"{moved}-shm").exists()  # SQLite rewrites the -shm index as it reads
    (line,) = warnings(caplog)
    assert str(path) in line and str(moved) in line
    assert spool.quarantined == 1 and len(spool) == 0

    seq = spool.put("t/verdict", b"fresh")
    assert [(i.seq, i.payload) for i in spool.pending(10)] == [(seq, b"fresh")]
    spool.close()
    assert Spool(path, max_messages=100, max_bytes=1 << 20).quarantined == 0  # the fresh one is fine


def test_damage_found_at_run_time_moves_the_file_aside_and_numbering_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.sqlite"
    spool = Spool(path, max_messages=1000, max_bytes=1 << 20)
    old = [spool.put("t/verdict", b"v%d" % i) for i in range(50)]
    overwrite_pages(path)

    new = spool.put_many([Message("t/verdict", b"after"), Message("t/image/x", b"hm", kind="image")])
    (moved,) = moved_aside(path)
    assert spool.quarantined == 1 and Path(f"{moved}-wal").exists()  # the log went with it
    assert min(new) > max(old)  # an ack meant for the old file cannot delete a new item
    assert spool.ack(old) == 0 and len(spool) == 2
    assert [i.payload for i in spool.pending(10)] == [b"after", b"hm"]
    (line,) = warnings(caplog)
    assert "malformed" in line and "the 50 item(s) waiting in it are not delivered" in line
    spool.close()


def test_the_publisher_goes_on_after_its_spool_was_replaced(mosquitto: Any, subscribers: Any, publishers: Any,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    cfg = config(mosquitto, tmp_path, spool_path=path, images="all", last_ng="none")
    sub = subscribers(mosquitto, image_prefix=image_root(cfg))
    pub = publishers(cfg)
    for i in range(3):
        pub.publish(verdict_only(i))
    sub.wait_for(lambda: len(sub.verdict_ids()) == 3, "the first verdicts")
    overwrite_pages(path)

    for i in range(3, 6):
        pub.publish(make_inspection(i))
    sub.wait_for(lambda: len(sub.verdict_ids()) == 6 and len(image_ids(sub, cfg)) == 3, "the verdicts after it")
    assert sub.verdict_ids() == [f"f{i:05d}" for i in range(6)]
    assert pub.stats.spool_quarantined == 1 and len(moved_aside(path)) == 1
    assert pub.stop(timeout_s=10) is True
