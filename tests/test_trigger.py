"""The trigger source in-process: what it refuses, a capture that delivers nothing, a free-running
capture's frame taken after the trigger. (The MQTT handshake end to end: test_plc.py.)"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.sources import SourceError, open_source
from agent.sources.trigger import TriggerRequest
from conftest import source_settings

SYNTHETIC = {"kind": "synthetic", "mode": "free", "count": 0, "fps": 20, "size": [64, 64]}


def trigger_source(**values: object):
    return open_source(source_settings(kind="trigger", **values))


def test_refusals_are_said_at_once(sample_data: Path, tmp_path: Path) -> None:
    shutil.copy(min((sample_data / "test" / "good").iterdir()), tmp_path / "part.png")
    source = trigger_source(image_root=str(tmp_path), queue_size=1)
    assert "outside" in source.request(TriggerRequest("p", image_path="../etc/passwd"))
    assert "capture" in source.request(TriggerRequest("p"))  # no capture source: a file is needed
    assert source.request(TriggerRequest("p1", image_path="part.png")) is None
    assert "already waiting" in source.request(TriggerRequest("p2", image_path="part.png"))
    source.start()
    frame = source.get(timeout=10)
    assert frame is not None and frame.image is not None and frame.meta["part_id"] == "p1"
    source.stop()
    assert "stopping" in source.request(TriggerRequest("p3", image_path="part.png"))
    with pytest.raises(SourceError, match="capture"):
        trigger_source()
    with pytest.raises(ValidationError, match="a trigger source is triggered"):
        source_settings(kind="trigger", mode="free", image_root=str(tmp_path))
    with pytest.raises(ValidationError, match="cannot capture from another trigger"):
        source_settings(kind="trigger", capture={"kind": "trigger"})


def test_a_capture_that_delivers_nothing_gives_an_error_frame_with_the_part_id(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    source = trigger_source(capture={"kind": "folder", "path": str(empty), "watch": True}, timeout_s=0.3)
    source.start()
    try:
        assert source.request(TriggerRequest("4711", {"lot": "A7"})) is None
        frame = source.get(timeout=10)
    finally:
        source.stop()
    assert frame is not None and frame.image is None and "4711" in frame.error and "0.3 s" in frame.error
    assert frame.meta["part_id"] == "4711" and frame.meta["part_meta"] == {"lot": "A7"}


def test_a_free_running_capture_gives_a_frame_taken_after_the_trigger() -> None:
    source = trigger_source(capture=SYNTHETIC)
    source.start()
    try:
        time.sleep(0.3)  # let the capture run ahead: its queued frame is older than the trigger
        request = TriggerRequest("4712")
        assert source.request(request) is None
        frame = source.get(timeout=10)
    finally:
        source.stop()
    assert frame is not None and frame.image is not None and frame.t >= request.t
    assert frame.meta["part_id"] == "4712" and frame.source == "trigger"
