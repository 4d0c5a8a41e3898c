"""Fault class 4: a spool that degrades instead of crashing (disk full on a real small filesystem,
a damaged file, a path that cannot work, a kill between a verdict and its images)."""
from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fault_helpers import (Agent, check_config, one_line_error, run_agent, synthetic, verdicts, wait_until,
                           write_config)

pytestmark = pytest.mark.slow


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem the test can fill."""
    path = tmp_path / "small"
    mount_tmpfs(path, "size=1m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path) -> Path:
    """Fill ``fs`` to the last byte with one file; removing it gives the space back."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def seqs(ids) -> set[int]:
    return {int(i.rsplit("-", 1)[1]) for i in ids}


def last_health(sub) -> dict:
    messages = sub.on("plant/faults/health")
    return json.loads(messages[-1].payload) if messages else {}


def test_disk_full_during_an_outage_loses_nothing_it_does_not_count(mosquitto, subscribers, padim_bundle, tmp_path,
                                                                small_fs) -> None:
    # A persistent session: the broker keeps what the agent sends while this subscriber reconnects
    # after the outage (the agent may be back first and flush at once).
    sub = subscribers(mosquitto, prefix="plant/faults", protocol=mqtt.MQTTv311, client_id="plc", persistent=True)
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=10),
                               mqtt={"spool_path": str(small_fs / "spool.sqlite")}))
    try:
        agent.wait_ready()
        wait_until(lambda: len(verdicts(sub)) >= 3, "verdicts before the outage")
        mosquitto.stop()
        filler = fill(small_fs)  # the outage meets a full disk: what cannot be kept is lost, and counted
        wait_until(lambda: any("WARNING" in line and "spool" in line for line in agent.lines),
                   "the warning that the spool cannot store")
        time.sleep(1.0)  # the outage lasts a while longer
        filler.unlink()  # space returns, then the broker
        mosquitto.start()
        wait_until(lambda: last_health(sub).get("frames", 0) >= 10, "health after the broker returned")
        before = len(verdicts(sub))
        wait_until(lambda: len(verdicts(sub)) >= before + 5, "verdicts after the broker returned")
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0, agent.log[-3000:]
    finally:
        agent.kill()
    health = agent.health()
    lost = health["mqtt"]["lost"]
    wait_until(lambda: len(verdicts(sub)) + lost >= health["frames"], "the flushed spool")
    received = seqs(verdicts(sub))
    # The full disk was met (writes failed, verdicts went around the spool) ...
    assert health["mqtt"]["spool_errors"] >= 1 and health["mqtt"]["direct"] >= 1
    # ... and nothing vanished unaccounted: every frame was delivered or counted as lost, never both.
    # A short outage fits in memory: nothing is lost at all.
    assert len(received) + lost == health["frames"] and lost == 0
    assert received == set(range(health["frames"]))
    assert "Traceback" not in agent.log


def test_disk_full_at_start_sends_verdicts_around_the_spool(mosquitto, subscribers, padim_bundle, tmp_path,
                                                             small_fs) -> None:
    fill(small_fs)
    sub = subscribers(mosquitto, prefix="plant/faults")
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(6),
                               mqtt={"spool_path": str(small_fs / "spool.sqlite")}))
    assert agent.wait() == 0, agent.log[-3000:]  # a full disk is a fault to live with, not a configuration error
    wait_until(lambda: len(verdicts(sub)) == 6, "6 verdicts sent without a spool")
    health = agent.health()
    assert health["mqtt"]["direct"] >= 6 and health["mqtt"]["lost"] == 0


def test_damaged_spool_is_moved_aside(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    spool = tmp_path / "spool.sqlite"
    spool.write_bytes(b"SQLite format 3\0" + b"\x13" * 5000)  # a torn, overwritten file
    sub = subscribers(mosquitto, prefix="plant/faults")
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(5)))
    assert agent.wait() == 0, agent.log[-3000:]
    wait_until(lambda: len(verdicts(sub)) == 5, "5 verdicts through a fresh spool")
    aside = list(tmp_path.glob("spool.sqlite.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"SQLite format 3\0\x13")
    assert [line for line in agent.lines if "WARNING" in line and aside[0].name in line]
    assert agent.health()["mqtt"]["spool_quarantined"] == 1


def test_spool_path_on_a_read_only_filesystem_is_a_configuration_error(mosquitto, padim_bundle,
                                                                         tmp_path) -> None:
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "size=64k,ro")
    try:
        config = write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(3),
                              mqtt={"spool_path": str(ro / "spool" / "spool.sqlite")})
        for code, log in (run_agent(config), check_config(config)):
            assert code == 2
            assert "mqtt.spool_path" in one_line_error(log)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_kill_never_leaves_a_verdict_without_its_images(mosquitto, padim_bundle, tmp_path) -> None:
    mosquitto.stop()  # everything stays in the spool
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=30),
                               mqtt={"images": "all"}))
    spool = tmp_path / "spool.sqlite"

    def spooled() -> int:
        try:
            with sqlite3.connect(spool) as db:
                return db.execute("select count(*) from spool where kind = 'verdict'").fetchone()[0]
        except sqlite3.Error:
            return 0

    try:
        wait_until(lambda: spooled() >= 20, "20 spooled verdicts")
    finally:
        agent.kill()  # SIGKILL, in the middle of the stream
    with sqlite3.connect(spool) as db:
        rows = db.execute("select kind, topic, payload from spool order by seq").fetchall()
    verdicts = [json.loads(p) for kind, _, p in rows if kind == "verdict"]
    images = [t for kind, t, _ in rows if kind == "image" and not t.endswith("/last_ng")]
    # Pairs, in order, none torn: each verdict's image on its status's topic.
    assert verdicts and images == [f"images/plant/faults/{v['status']}/{v['frame_id']}" for v in verdicts]
    # The retained last NG image: only the newest waits, the spool dropped those it replaced.
    assert len([t for _, t, _ in rows if t.endswith("/last_ng")]) == 1
