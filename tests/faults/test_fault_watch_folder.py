"""Fault class 3: a watched folder takes a file once it is complete, a reused name is a new frame,
and odd entries (symlink loops, dangling links, directories named like images) are skipped
with one log line each."""
from __future__ import annotations

import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest

from calibration.synthetic import synthetic_part
from fault_helpers import Agent, verdicts, wait_until, write_config

pytestmark = pytest.mark.slow


def png(seed: int) -> bytes:
    img, _ = synthetic_part(np.random.default_rng(seed), (160, 192), None)
    return cv2.imencode(".png", img)[1].tobytes()


def slow_write(path, data: bytes, pieces: int = 5, pause_s: float = 0.3) -> None:
    """A camera writing over a slow share: pauses longer than a poll, shorter than the settle time."""
    step = -(-len(data) // pieces)
    with open(path, "wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            f.flush()
            time.sleep(pause_s)  # the writer's pace, not a wait on the agent


def test_watched_folder(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    (folder / "dir.png").mkdir()
    sub = subscribers(mosquitto, prefix="plant/faults")
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path,
                               {"kind": "folder", "path": str(folder), "watch": True, "poll_s": 0.1,
                                "settle_s": 2.0}))
    try:
        agent.wait_ready()
        writer = threading.Thread(target=slow_write, args=(folder / "part.png", png(1)))
        writer.start()
        writer.join()
        wait_until(lambda: len(verdicts(sub)) == 1, "the verdict of the slowly written file")
        (first_id, first), = verdicts(sub).items()
        assert first["status"] in ("ok", "ng"), first  # taken complete, not half-written
        assert first_id.startswith("part-")

        (folder / "part.png").write_bytes(png(2))  # the camera reuses the name for the next part
        wait_until(lambda: len(verdicts(sub)) == 2, "a second verdict for the reused name")
        (folder / "zz_last.png").write_bytes(png(3))
        wait_until(lambda: len(verdicts(sub)) == 3, "the last file's verdict")
        ids = list(verdicts(sub))
        assert len(sub.on("plant/faults/verdict")) == 3  # nothing was taken twice
        assert ids[1].startswith("part-") and ids[1] != first_id

        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
        for name in ("loop_a.png", "loop_b.png", "dangling.png", "dir.png"):
            mentions = [line for line in agent.lines if name in line and "WARNING" in line]
            assert len(mentions) == 1, (name, mentions)
        health = agent.health()
        assert health["source"]["skipped"] == 4 and health["frames"] == 3
    finally:
        agent.kill()
