"""The NG archive on real files: the layout, valid sidecars, retention by size and age, a full queue, and a
full or read-only filesystem (a real tmpfs) that degrades and recovers. The agent end to end is in
tests/faults/test_fault_archive.py."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from jsonschema import Draft202012Validator

from agent.archive import Archive, ArchiveSettings, file_stem
from agent.verdict import Inspection, ModelInfo, Region, Verdict
from conftest import fill, remount
from mqtt_client import wait_until

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "agent" / "verdict.schema.json").read_text())
MODEL = ModelInfo("bracket", "2025-01-01T00:00:00Z", "padim")
T0 = (time.time() // 3600 - 1) * 3600 + 60  # a minute into the last hour: within any max_age_days


def inspection(i: int, status: str = "ng", t: float = T0, frame_id: str | None = None) -> Inspection:
    rng = np.random.default_rng(i)
    frame = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)  # noise: a record of a known, real size
    score_map = np.full((120, 160), 1.0, np.float32)
    regions = []
    if status == "ng":
        score_map[10:30, 20:50] = 8.0
        regions = [Region(20, 10, 30, 20, 600, 8.0)]
    verdict = Verdict(frame_id=frame_id or f"f{i:03d}", seq=i, source="cam", timestamp=t, status=status,
                      model=MODEL, image_score=9.0 if status == "ng" else 1.0, threshold=5.0,
                      normalized_score=1.8 if status == "ng" else 0.2, pixel_threshold=4.0, regions=regions)
    return Inspection(verdict, frame, score_map)


def hour_folder(root: Path, t: float) -> Path:
    return root / time.strftime("%Y-%m-%d/%H", time.gmtime(t))


def archive(folder: Path, **settings: object) -> Archive:
    return Archive(ArchiveSettings(dir=folder, **settings), image_max_side=100)


def records(root: Path) -> dict[str, Path]:
    """Complete records (those with a sidecar) by frame id, wherever they are."""
    return {json.loads(p.read_text())["frame_id"]: p for p in root.rglob("*.json")}


def test_ng_frames_and_every_nth_ok_frame_become_records_with_valid_sidecars(tmp_path: Path) -> None:
    a = archive(tmp_path / "archive", every_ok=2)
    a.start()
    statuses = ["ng", "ok", "ok", "ok", "ok", "ng"]
    kept = [inspection(i, status) for i, status in enumerate(statuses)]
    for insp in kept:
        a.publish(insp)
    error = Verdict(frame_id="f-error", seq=9, source="cam", timestamp=T0, status="error", model=MODEL, error="x")
    a.publish(Inspection(error))
    a.stop(10.0)

    folder = hour_folder(tmp_path / "archive", T0)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"f{i:03d}{suffix}" for i in (0, 2, 4, 5) for suffix in (".png", ".overlay.jpg", ".json"))
    validator = Draft202012Validator(SCHEMA)
    for i in (0, 2, 4, 5):
        sidecar = json.loads((folder / f"f{i:03d}.json").read_text())
        validator.validate(sidecar)
        assert sidecar == json.loads(kept[i].verdict.to_json())
        frame = cv2.imread(str(folder / f"f{i:03d}.png"), cv2.IMREAD_COLOR)
        assert np.array_equal(frame, kept[i].image)  # the frame as inspected, lossless
        assert cv2.imread(str(folder / f"f{i:03d}.overlay.jpg")).shape == (75, 100, 3)  # bounded
    stats = a.stats
    assert (stats.written, stats.dropped, stats.failed, stats.deleted, stats.state) == (4, 0, 0, 0, "ok")
    assert stats.bytes == sum(p.stat().st_size for p in folder.iterdir())


def test_a_frame_id_becomes_one_safe_file_name() -> None:
    assert file_stem("part_0012") == "part_0012"
    assert file_stem("cam/1%\\x") == "cam%2F1%25%5Cx"
    assert file_stem("..") == "%2E." and file_stem(".hidden") == "%2Ehidden"


def test_over_its_size_the_archive_deletes_the_oldest_records(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    probe = archive(tmp_path / "probe")
    probe.start()
    probe.publish(inspection(0))
    probe.stop(10.0)
    record = probe.stats.bytes  # one record's size
    a = archive(root, max_bytes=int(record * 3.5))
    a.start()
    for i in range(10):  # five in one hour, five in the next
        a.publish(inspection(i, t=T0 + (0 if i < 5 else 3600)))
        wait_until(lambda: a.stats.written == i + 1, f"record {i}")
    a.stop(10.0)

    assert sorted(records(root)) == ["f007", "f008", "f009"]  # the newest that fit
    assert not hour_folder(root, T0).exists()  # the older hour folder went when it was emptied
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 9 and sum(p.stat().st_size for p in files) == a.stats.bytes <= record * 3.5
    assert a.stats.deleted == 7


def test_at_start_hour_folders_older_than_max_age_are_deleted(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    old = root / "2001-02-03" / "04"
    old.mkdir(parents=True)
    for name in ("a.png", "a.overlay.jpg", "a.json", "b.json"):
        (old / name).write_bytes(b"x" * 100)
    now = time.gmtime()
    recent = root / time.strftime("%Y-%m-%d", now) / time.strftime("%H", now)
    recent.mkdir(parents=True)
    (recent / "c.json").write_bytes(b"{}")
    (recent / ".c.png.tmp").write_bytes(b"torn")  # a killed writer's leftover
    (root / "notes").mkdir()  # not ours: left alone
    a = archive(root, max_age_days=1.0)
    a.start()
    wait_until(lambda: not old.parent.exists(), "the old date folder deleted")
    a.stop(10.0)
    assert (recent / "c.json").exists() and not (recent / ".c.png.tmp").exists() and (root / "notes").is_dir()
    assert a.stats.deleted == 2 and a.stats.bytes == 2


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = archive(tmp_path / "archive", queue_size=2)  # not started: nothing takes from the queue yet
    t = time.monotonic()
    for i in range(5):
        a.publish(inspection(i))
    assert time.monotonic() - t < 5.0  # never blocks (a bound on a hang, not a timing claim)
    assert a.stats.dropped == 3 and a.stats.queued == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # once per episode
    a.start()
    a.stop(10.0)
    assert sorted(records(tmp_path / "archive")) == ["f000", "f001"] and a.stats.written == 2


def test_a_read_only_folder_degrades_and_the_archive_recovers(tmpfs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.archive")
    root = tmpfs("archive", "size=4m")
    a = archive(root)
    a.start()
    a.publish(inspection(0))
    wait_until(lambda: a.stats.written == 1, "the first record")
    remount(root, "ro")
    try:
        for i in range(1, 4):
            a.publish(inspection(i))
        wait_until(lambda: a.stats.failed == 3, "three failed records")
        assert a.stats.state == "failing" and "Read-only file system" in a.stats.reason
    finally:
        remount(root, "rw")
    a.publish(inspection(4))
    wait_until(lambda: a.stats.written == 2, "a record once the folder is writable again")
    a.stop(10.0)
    assert a.stats.state == "ok" and sorted(records(root)) == ["f000", "f004"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Read-only file system" in warnings[0]  # once per episode
    assert any("writing again" in r.getMessage() and "3 record(s)" in r.getMessage() for r in caplog.records)


def test_a_full_disk_leaves_no_torn_record_and_the_archive_recovers(tmpfs) -> None:
    root = tmpfs("archive", "size=256k")
    a = archive(root)
    a.start()
    filler = fill(root)
    for i in range(3):
        a.publish(inspection(i))
    wait_until(lambda: a.stats.failed == 3, "three failed records")
    assert a.stats.state == "failing" and "No space left" in a.stats.reason
    left = [p for p in root.rglob("*") if p.is_file() and p != filler]
    assert left == []  # what was half written is removed again, temporary files too
    os.unlink(filler)
    a.publish(inspection(3))
    wait_until(lambda: a.stats.written == 1, "a record once there is room")
    a.stop(10.0)
    assert sorted(records(root)) == ["f003"] and a.stats.state == "ok"
