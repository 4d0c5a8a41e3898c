"""Fault class 8: quiet, useful logs. One warning when a broker outage starts and one line when it
ends, no ERROR per retry; refused credentials are one clear line, visible in health."""
from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from fault_helpers import Agent, synthetic, verdicts, wait_until, write_config

pytestmark = pytest.mark.slow


def test_two_outages_give_two_warnings_and_two_recoveries(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    mosquitto.stop()  # down when the agent starts
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=10)))
    try:
        agent.wait_ready()
        agent.wait_log("cannot connect")
        wait_until(lambda: len(agent.lines) > 0 and agent.proc.poll() is None, "the agent running")
        mosquitto.start()
        sub = subscribers(mosquitto, prefix="plant/faults")
        agent.wait_log("reconnected")
        mosquitto.stop()  # a second outage, while running
        agent.wait_log("lost the connection")
        mosquitto.start()
        agent.wait_log("reconnected", 2)
        wait_until(lambda: len(verdicts(sub)) >= 3, "verdicts after the outages")
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        agent.kill()
    mqtt_lines = [line for line in agent.lines if " agent.mqtt" in line]
    warnings = [line for line in mqtt_lines if " WARNING " in line]
    assert len(warnings) == 2, warnings  # one per outage, however many retries
    assert len([line for line in mqtt_lines if "reconnected" in line]) == 2
    assert not [line for line in agent.lines if " ERROR " in line]


def test_refused_credentials_are_one_clear_line_and_in_health(mosquitto_factory, padim_bundle, tmp_path) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd is not installed (it ships with the mosquitto package)")
    users = tmp_path / "users"
    subprocess.run([passwd, "-b", "-c", str(users), "agent", "right-password"], check=True, capture_output=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {users}\n")
    (tmp_path / "password").write_text("wrong-password\n")
    agent = Agent(write_config(tmp_path, broker, padim_bundle.path, synthetic(0, fps=10),
                               mqtt={"username": "agent", "password_file": str(tmp_path / "password")}))
    try:
        agent.wait_ready()
        agent.wait_log("refused")
        wait_until(lambda: broker.log.read_text().count("not authorised") >= 3, "a few refused attempts at the broker")
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        agent.kill()
    errors = [line for line in agent.lines if " ERROR " in line]
    assert len(errors) == 1 and "refused" in errors[0] and "agent" in errors[0], errors
    assert "wrong-password" not in agent.log
    health = agent.health()
    assert health["mqtt"]["state"] == "refused" and health["mqtt"]["state_reason"]
