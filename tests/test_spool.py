"""The on-disk spool: order, acks, the full-spool policy, pairs written together, durability across a
killed process. Faults (full disk, damaged files) are in test_spool_faults.py."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest

from agent.spool import Message, Spool

from mqtt_client import wait_until


def test_pending_in_insertion_order_and_ack_removes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=1 << 20)
    seqs = [spool.put("t/verdict", f"v{i}".encode(), kind="verdict") for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    items = spool.pending(10)
    assert [i.payload for i in items] == [f"v{i}".encode() for i in range(5)]
    assert items[0].topic == "t/verdict" and items[0].qos == 1 and items[0].retain is False
    assert items[0].kind == "verdict" and items[0].created > 0

    assert spool.ack([seqs[0], seqs[2]]) == 2
    assert [i.payload for i in spool.pending(10)] == [b"v1", b"v3", b"v4"]
    assert [i.payload for i in spool.pending(1, after_seq=seqs[1])] == [b"v3"]
    assert len(spool) == 3 and spool.nbytes == 6
    assert spool.ack([seqs[0]]) == 0  # acking twice is harmless
    spool.close()


def test_full_by_count_drops_oldest_images_then_oldest_verdicts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=4, max_bytes=1 << 20)
    for i in range(3):
        spool.put("t/verdict", f"v{i}".encode(), kind="verdict")
        spool.put(f"t/image/{i}", f"h{i}".encode(), kind="image")
    # 6 puts into 4 places: the two oldest images went first.
    assert [i.payload for i in spool.pending(10)] == [b"v0", b"v1", b"v2", b"h2"]
    assert spool.dropped == 2

    spool.put("t/verdict", b"v3", kind="verdict")  # drops h2, the last image
    spool.put("t/verdict", b"v4", kind="verdict")  # no image left: drops v0
    assert [i.payload for i in spool.pending(10)] == [b"v1", b"v2", b"v3", b"v4"]
    assert spool.dropped == 4 and len(spool) == 4


def test_full_by_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=1000, max_bytes=100)
    spool.put("t/verdict", b"a" * 30, kind="verdict")
    spool.put("t/image/1", b"h" * 60, kind="image")
    spool.put("t/verdict", b"b" * 30, kind="verdict")  # 120 bytes: the image goes
    assert [i.payload[:1] for i in spool.pending(10)] == [b"a", b"b"]
    assert spool.nbytes == 60 and spool.dropped == 1
    spool.put("t/verdict", b"c" * 500, kind="verdict")  # larger than the spool: nothing fits
    assert len(spool) == 0 and spool.nbytes == 0 and spool.dropped == 4


def test_reopen_keeps_items_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path, max_messages=3, max_bytes=1 << 20)
    for i in range(3):
        spool.put("t/verdict", f"v{i}".encode())
    spool.close()
    spool = Spool(path, max_messages=3, max_bytes=1 << 20)
    assert len(spool) == 3
    spool.put("t/verdict", b"v3")  # the limit counts what was already there
    assert [i.payload for i in spool.pending(10)] == [b"v1", b"v2", b"v3"]


_WRITER = """
import os, sys, time
from pathlib import Path
from agent.spool import Spool
spool = Spool(Path(sys.argv[1]), max_messages=1000, max_bytes=1 << 20)
for i in range(50):
    spool.put("t/verdict", b"v%d" % i, kind="verdict")
spool.ack([item.seq for item in spool.pending(10)])
print("written", flush=True)
time.sleep(60)
"""


def test_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    spool = Spool(path, max_messages=1000, max_bytes=1 << 20)
    assert [i.payload for i in spool.pending(100)] == [b"v%d" % i for i in range(10, 50)]


def test_concurrent_put_and_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=10_000, max_bytes=1 << 24)
    n = 500
    acked: list[int] = []
    done = threading.Event()

    def acker() -> None:
        while not (done.is_set() and len(acked) == n):
            items = spool.pending(20, after_seq=acked[-1] if acked else 0)
            spool.ack([i.seq for i in items])
            acked.extend(i.seq for i in items)

    thread = threading.Thread(target=acker)
    thread.start()
    for i in range(n):
        spool.put("t/verdict", b"%d" % i)
    done.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(acked) == n and acked == sorted(acked) and len(spool) == 0


def test_bad_limits_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(tmp_path / "s.sqlite", max_messages=10, max_bytes=0)


def test_a_path_that_cannot_hold_a_spool_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot open"):
        Spool(tmp_path, max_messages=10, max_bytes=1000)  # a directory
    assert [p.name for p in tmp_path.iterdir()] == []  # and it was not taken for a damaged file


def test_put_many_stores_in_order_and_makes_room_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=3, max_bytes=1 << 20)
    spool.put("t/verdict", b"v0")
    seqs = spool.put_many([Message("t/verdict", b"v1"), Message("t/image/1", b"h1", kind="image"),
                           Message("t/verdict", b"v2")])
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # Four items into three places: the policy ran on the whole write, so the image went.
    assert [i.payload for i in spool.pending(10)] == [b"v0", b"v1", b"v2"]
    assert spool.dropped == 1 and len(spool) == 3
    assert spool.put_many([]) == []


_PAIR_WRITER = """
import sys
from pathlib import Path
from agent.spool import Message, Spool
spool = Spool(Path(sys.argv[1]), max_messages=1_000_000, max_bytes=1 << 30)
i = 0
while True:
    spool.put_many([Message("t/verdict", b"v%d" % i),
                    Message("t/image/%d" % i, b"h%d." % i + bytes(4000), kind="image")])
    if i == 0:
        print("writing", flush=True)
    i += 1
"""


def test_a_killed_writer_never_leaves_a_verdict_without_its_image(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    for round_ in range(6):  # several kills, at different points of the loop
        proc = subprocess.Popen([sys.executable, "-c", _PAIR_WRITER, str(path)], stdout=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parents[1])
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
            wait_until(lambda: _rows(path) >= 40 * (round_ + 1) + 7 * round_, "the writer's pairs")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        spool = Spool(path, max_messages=1_000_000, max_bytes=1 << 30)
        items = spool.pending(1_000_000)
        spool.close()
        verdicts = [i.payload.decode() for i in items if i.kind == "verdict"]
        images = [i.payload.split(b".")[0].decode() for i in items if i.kind == "image"]
        assert [v[1:] for v in verdicts] == [h[1:] for h in images]  # pair by pair, none alone
        assert len(items) % 2 == 0


def _rows(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]


def test_user_properties_come_back_as_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=1 << 20)
    props = (("frame_id", "cam1/7"), ("status", "ng"), ("score", "1.2500"))
    spool.put_many([Message("t/verdict", b"v"), Message("i/ng/cam1%2F7", b"img", kind="image", user_properties=props)])
    spool.close()
    items = Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=1 << 20).pending(10)
    assert [i.user_properties for i in items] == [(), props]


def test_a_retained_message_replaces_the_older_unsent_ones_on_its_topic(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=1 << 20)
    for i in range(3):
        spool.put_many([Message("t/verdict", b"v%d" % i), Message("i/last_ng", b"last%d" % i, retain=True,
                                                                  kind="image")])
    spool.put("i/other", b"kept", retain=True, kind="image")
    assert [i.payload for i in spool.pending(10)] == [b"v0", b"v1", b"v2", b"last2", b"kept"]
    assert len(spool) == 5 and spool.nbytes == 3 * 2 + 5 + 4 and spool.dropped == 0
    assert _rows(tmp_path / "s.sqlite") == 5
    spool.close()


def test_a_spool_of_the_layout_before_user_properties_is_delivered(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB "
                   "NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL, created REAL NOT "
                   "NULL)")
        db.execute("INSERT INTO spool (topic, payload, qos, retain, kind, created) VALUES "
                   "('t/verdict', x'7630', 1, 0, 'verdict', 1.0)")
        db.commit()
    spool = Spool(path, max_messages=100, max_bytes=1 << 20)
    assert spool.quarantined == 0
    spool.put("t/verdict", b"v1")
    assert [(i.payload, i.user_properties) for i in spool.pending(10)] == [(b"v0", ()), (b"v1", ())]
    spool.close()
