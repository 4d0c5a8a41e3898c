"""Fault class 5: stops lose nothing (every captured frame gets a verdict, within the stop timeout),
SIGHUP is logged and ignored, and the process is gone right after its last log line."""
from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest

from fault_helpers import Agent, synthetic, verdicts, wait_until, write_config

pytestmark = pytest.mark.slow


def spooled_verdicts(spool: Path) -> dict[str, dict]:
    with sqlite3.connect(spool) as db:
        rows = db.execute("select payload from spool where kind = 'verdict'").fetchall()
    return {json.loads(p)["frame_id"]: json.loads(p) for (p,) in rows}


@pytest.mark.parametrize("stop_timeout_s", [5.0, 0.01], ids=["time-to-judge", "no-time-to-judge"])
def test_sigterm_with_a_backlog_gives_every_captured_frame_one_verdict(mosquitto, subscribers, padim_bundle,
                                                                         tmp_path, stop_timeout_s) -> None:
    sub = subscribers(mosquitto, prefix="plant/faults")
    # fps 0: the source captures as fast as it can, so the triggered queue is always full.
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, queue_size=8),
                               agent={"stop_timeout_s": stop_timeout_s}))
    try:
        agent.wait_ready()
        wait_until(lambda: len(verdicts(sub)) >= 5, "the line running")
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0, agent.log[-3000:]
    finally:
        agent.kill()
    health = agent.health()
    captured = health["source"]["frames"]
    left = spooled_verdicts(tmp_path / "spool.sqlite")  # not flushed in time: kept for the next start
    wait_until(lambda: len(verdicts(sub)) + len(left) >= captured, f"{captured} verdicts")
    got = {**verdicts(sub), **left}
    assert len(got) == captured == health["frames"]  # one verdict per captured frame, by frame id
    assert not set(verdicts(sub)) & set(left)
    unjudged = [v for v in got.values() if v["status"] == "error"]
    assert len(unjudged) == health["unjudged"]
    if stop_timeout_s >= 5.0:
        assert not unjudged  # a few queued frames take far less than the timeout
    else:
        assert unjudged and all("not inspected" in v["error"] for v in unjudged)


def test_sighup_is_logged_and_ignored(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    sub = subscribers(mosquitto, prefix="plant/faults")
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=20)))
    try:
        agent.wait_ready()
        agent.signal(signal.SIGHUP)
        agent.wait_log("SIGHUP ignored")
        before = len(verdicts(sub))
        wait_until(lambda: len(verdicts(sub)) >= before + 5, "verdicts after SIGHUP")
        assert agent.proc.poll() is None
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        agent.kill()


def test_the_last_log_line_is_the_stop_summary(mosquitto, padim_bundle, tmp_path) -> None:
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=20)))
    try:
        agent.wait_ready()
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        agent.kill()
    assert "stopped after" in agent.lines[-1]
