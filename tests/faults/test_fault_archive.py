"""Fault class 9: the NG archive under the real ``run`` command. Records for NG frames with valid sidecars,
retention by size while running, and a read-only or full archive filesystem (a real tmpfs) that costs the
records, counted in health and logged once per episode, never inspection or a verdict."""
from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest
from jsonschema import Draft202012Validator

from conftest import fill, remount
from fault_helpers import PREFIX, REPO, Agent, synthetic, verdicts, wait_until, write_config

pytestmark = pytest.mark.slow

SCHEMA = json.loads((REPO / "agent" / "verdict.schema.json").read_text())


def sidecars(root: Path) -> dict[str, dict]:
    """Complete records by frame id: their sidecar (the verdict)."""
    return {json.loads(p.read_text())["frame_id"]: json.loads(p.read_text()) for p in root.rglob("*.json")}


def ng_ids(sub) -> list[str]:
    """NG frame ids in the order the frames were taken."""
    return [v["frame_id"] for v in sorted(verdicts(sub).values(), key=lambda v: v["seq"]) if v["status"] == "ng"]


def archive_health(sub) -> Callable[[], dict]:
    """The archive's figures in the agent's latest health message."""
    def latest() -> dict:
        messages = sub.on(f"{PREFIX}/health")
        return json.loads(messages[-1].payload)["archive"] if messages else {}
    return latest


def archive_warnings(agent: Agent) -> list[str]:
    return [line for line in agent.lines if " WARNING agent.archive" in line]


def test_ng_frames_are_archived_with_valid_sidecars(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    root = tmp_path / "archive"
    sub = subscribers(mosquitto, prefix=PREFIX)
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(12),
                               agent={"archive": {"dir": str(root)}}))
    assert agent.wait() == 0, agent.log[-3000:]
    wait_until(lambda: len(verdicts(sub)) == 12, "12 verdicts")
    ng = ng_ids(sub)
    records = sidecars(root)
    assert ng and sorted(records) == sorted(ng)  # every NG frame, nothing else
    validator = Draft202012Validator(SCHEMA)
    for frame_id, sidecar in records.items():
        validator.validate(sidecar)
        assert sidecar == verdicts(sub)[frame_id]  # the verdict the plant received
        (json_path,) = root.rglob(f"{frame_id}.json")
        folder = json_path.parent
        assert folder.parent.parent == root and len(folder.name) == 2 and len(folder.parent.name) == 10
        assert cv2.imread(str(folder / f"{frame_id}.png")).shape == (160, 192, 3)
        assert cv2.imread(str(folder / f"{frame_id}.overlay.jpg")) is not None
    health = agent.health()["archive"]
    assert health["written"] == len(ng) and health["failed"] == health["dropped"] == 0


def test_over_its_size_the_running_agent_deletes_the_oldest_records(mosquitto, subscribers, padim_bundle,
                                                                    tmp_path) -> None:
    root = tmp_path / "archive"
    max_bytes = 400_000  # a few records of a 160 x 192 frame
    sub = subscribers(mosquitto, prefix=PREFIX)
    # A long queue: no record is dropped for a writer starved by a loaded machine, so the order is exact.
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=10),
                               agent={"archive": {"dir": str(root), "max_bytes": max_bytes, "queue_size": 256}}))
    try:
        agent.wait_ready()
        wait_until(lambda: archive_health(sub)().get("deleted", 0) >= 5, "retention deleting records")
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0, agent.log[-3000:]
    finally:
        agent.kill()
    health = agent.health()["archive"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) == health["bytes"] <= max_bytes
    # Written in frame order (a record still queued at the stop deadline is the newest, and dropped).
    written = ng_ids(sub)[:health["written"]]
    kept = sorted(sidecars(root), key=written.index)
    assert kept == written[len(written) - len(kept):]  # the newest stayed, the oldest went
    assert health["deleted"] == len(written) - len(kept) >= 5


def test_a_read_only_archive_does_not_stop_inspection(mosquitto, subscribers, padim_bundle, tmp_path,
                                                      tmpfs) -> None:
    root = tmpfs("archive", "size=4m")
    sub = subscribers(mosquitto, prefix=PREFIX)
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=10),
                               agent={"archive": {"dir": str(root)}}))
    try:
        agent.wait_ready()
        wait_until(lambda: archive_health(sub)().get("written", 0) >= 2, "records while writable")
        remount(root, "ro")
        try:
            wait_until(lambda: archive_health(sub)().get("failed", 0) >= 3, "records failing")
            assert archive_health(sub)()["state"] == "failing"
            during = len(verdicts(sub))
            wait_until(lambda: len(verdicts(sub)) >= during + 5, "inspection going on")
        finally:
            remount(root, "rw")
        written = archive_health(sub)()["written"]
        wait_until(lambda: archive_health(sub)().get("written", 0) >= written + 2, "records again")
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0, agent.log[-3000:]
    finally:
        agent.kill()
    health = agent.health()
    wait_until(lambda: len(verdicts(sub)) == health["frames"], "every verdict")
    assert health["archive"]["state"] == "ok" and health["archive"]["failed"] >= 3
    (warning,) = archive_warnings(agent)  # once for the episode, however many records failed
    assert "Read-only file system" in warning
    assert [line for line in agent.lines if "archive: writing again" in line]
    records = sidecars(root)
    assert len(records) == health["archive"]["written"] and set(records) <= set(ng_ids(sub))
    assert "Traceback" not in agent.log


def test_a_full_archive_disk_does_not_stop_inspection(mosquitto, subscribers, padim_bundle, tmp_path,
                                                      tmpfs) -> None:
    root = tmpfs("archive", "size=256k")
    filler = fill(root)
    sub = subscribers(mosquitto, prefix=PREFIX)
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(12),
                               agent={"archive": {"dir": str(root)}}))
    assert agent.wait() == 0, agent.log[-3000:]  # a batch read to its end: a full disk changes nothing
    wait_until(lambda: len(verdicts(sub)) == 12, "all 12 verdicts")
    health = agent.health()["archive"]
    assert health["failed"] == len(ng_ids(sub)) > 0 and health["written"] == 0 and health["state"] == "failing"
    assert [p for p in root.rglob("*") if p.is_file()] == [filler]  # no torn record left behind
    (warning,) = archive_warnings(agent)
    assert "No space left on device" in warning
