"""The PLC handshake end to end: the `run` command with a trigger source against a real Mosquitto;
a separate MQTT 5 client plays the PLC (trigger, reload, pause, resume, each with a response topic)."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_client import WAIT_S, wait_until
from test_service import PREFIX, REPO, SCHEMA, finish, start_agent, write_config

REPLIES = "plc/station1/replies"


class Plc:
    """An MQTT 5 client that sends commands with a response topic and correlation data."""

    def __init__(self, broker: Any, username: str | None = None, password: str | None = None,
                 replies: str = REPLIES) -> None:
        self.replies: dict[bytes, dict] = {}
        self.reply_topic = replies
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plc", protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        subscribed: list[bool] = []
        self.client.on_subscribe = lambda *a: subscribed.append(True)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(replies, qos=1)
        wait_until(lambda: subscribed, "the PLC's subscription")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.replies[msg.properties.CorrelationData] = json.loads(msg.payload)

    def send(self, command: str, body: Any) -> bytes:
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        self.client.publish(f"{PREFIX}/cmd/{command}", json.dumps(body), qos=1, properties=props)
        return correlation

    def ask(self, command: str, body: Any) -> dict:
        correlation = self.send(command, body)
        wait_until(lambda: correlation in self.replies, f"the answer to {command} {body}")
        return self.replies[correlation]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_trigger_with_part_id_gives_one_verdict_carrying_it_and_commands_are_answered(
        mosquitto, subscribers, padim_bundle, sample_data: Path, tmp_path: Path) -> None:  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(min((sample_data / "test" / "good").iterdir()), images / "part.png")
    sub = subscribers(mosquitto, prefix=PREFIX)
    source = {"kind": "trigger", "image_root": str(images),
              "capture": {"kind": "synthetic", "mode": "free", "count": 0, "fps": 20, "size": [160, 192]}}
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, source,
                                    {"commands": True, "heartbeat_s": 0.2}))
    plc = Plc(mosquitto)
    try:
        sub.wait_for(lambda: len(sub.on(f"{PREFIX}/heartbeat")) >= 2, "two heartbeats")
        beats = [json.loads(m.payload) for m in sub.on(f"{PREFIX}/heartbeat")]
        assert beats[1]["seq"] > beats[0]["seq"] and beats[-1]["state"] == "serving"

        # From a file, then from the free-running capture: one verdict each, carrying the part id.
        answer = plc.ask("trigger", {"part_id": "4711", "meta": {"lot": "A7"}, "image_path": "part.png"})
        assert answer["ok"] and answer["part_id"] == "4711"
        assert answer["verdict"]["part_id"] == "4711" and answer["verdict"]["part_meta"] == {"lot": "A7"}
        assert answer["verdict"]["status"] in ("ok", "ng")
        answer = plc.ask("trigger", "4712")  # a bare part id
        assert answer["ok"] and answer["verdict"]["part_id"] == "4712" and answer["verdict"]["status"] in ("ok", "ng")
        sub.wait_for(lambda: len(sub.on(f"{PREFIX}/verdict")) >= 2, "two verdicts")
        verdicts = [json.loads(m.payload) for m in sub.on(f"{PREFIX}/verdict")]
        assert [v["part_id"] for v in verdicts] == ["4711", "4712"]  # exactly one each
        for v in verdicts:
            Draft202012Validator(SCHEMA).validate(v)
        # last_result follows the verdict topic: wait until the broker holds 4712's, so a subscriber
        # connecting now gets it retained and nothing live after it.
        sub.wait_for(lambda: any(json.loads(m.payload)["part_id"] == "4712" for m in sub.on(f"{PREFIX}/last_result")),
                     "4712's last_result")
        last = subscribers(mosquitto, prefix=PREFIX)  # an HMI connecting now: the retained last result
        last.wait_for(lambda: last.on(f"{PREFIX}/last_result"), "the retained last_result")
        (retained,) = last.on(f"{PREFIX}/last_result")
        assert retained.retain and json.loads(retained.payload)["part_id"] == "4712"

        # Refusals are answered at once, and give no verdict.
        assert plc.ask("trigger", {"part_id": "x", "image_path": "../../etc/passwd"})["ok"] is False
        assert "part_id" in plc.ask("trigger", {"meta": {}})["error"]
        assert plc.ask("pause", {}) == {"command": "pause", "ok": True, "error": None, "state": "paused"}
        sub.wait_for(lambda: json.loads(sub.on(f"{PREFIX}/heartbeat")[-1].payload)["state"] == "paused",
                     "a paused heartbeat")
        assert plc.ask("trigger", {"part_id": "4713"}) == {"command": "trigger", "ok": False, "error": "paused",
                                                           "part_id": "4713"}
        assert plc.ask("resume", {})["state"] == "serving"

        # A reload that cannot be verified keeps the old bundle; a good one switches.
        model_id = padim_bundle.manifest.model_id
        broken = tmp_path / "broken-bundle"
        shutil.copytree(padim_bundle.path, broken)
        tensors = next(p for p in broken.iterdir() if p.suffix in (".safetensors", ".npz"))
        tensors.write_bytes(tensors.read_bytes()[:-8] + b"corrupt!")
        answer = plc.ask("reload", {"bundle": str(broken)})
        assert answer["ok"] is False and answer["model_id"] == model_id and answer["error"]
        assert plc.ask("trigger", {"part_id": "4714"})["verdict"]["status"] in ("ok", "ng")  # still serving
        answer = plc.ask("reload", {})
        assert answer["ok"] is True and answer["model_id"] == model_id
        assert plc.ask("trigger", {"part_id": "4715"})["verdict"]["part_id"] == "4715"
        sub.wait_for(lambda: len(sub.on(f"{PREFIX}/verdict")) == 4, "four verdicts")
        assert [json.loads(m.payload)["part_id"] for m in sub.on(f"{PREFIX}/verdict")] == \
            ["4711", "4712", "4714", "4715"]
    finally:
        plc.close()
        proc.terminate()
    finish(proc)


def test_mqtt_311_trigger_is_answered_on_the_response_topic_with_its_correlation_id(
        mosquitto, subscribers, padim_bundle, sample_data: Path, tmp_path: Path) -> None:  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(min((sample_data / "test" / "good").iterdir()), images / "part.png")
    sub = subscribers(mosquitto, prefix=PREFIX)
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path,
                                    {"kind": "trigger", "image_root": str(images)}, {"protocol": "3.1.1"}))
    plc = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plc311", protocol=mqtt.MQTTv311)
    plc.connect(mosquitto.host, mosquitto.port)
    plc.loop_start()
    try:
        sub.wait_for(lambda: any(json.loads(m.payload)["state"] == "online" for m in sub.on(f"{PREFIX}/status")),
                     "the agent online")
        # The agent subscribes before it publishes "online" on the same connection: the broker has
        # the subscription once "online" is seen.
        plc.publish(f"{PREFIX}/cmd/pause", "{}", qos=1)  # mqtt.commands is off: not listened to
        plc.publish(f"{PREFIX}/cmd/trigger", json.dumps({"part_id": "P1", "image_path": "part.png",
                                                         "correlation_id": 17}), qos=1)
        sub.wait_for(lambda: sub.on(f"{PREFIX}/response/trigger"), "the answer on <prefix>/response/trigger")
        answer = json.loads(sub.on(f"{PREFIX}/response/trigger")[0].payload)
        assert answer["correlation_id"] == 17 and answer["verdict"]["part_id"] == "P1"  # not paused
        assert not sub.on(f"{PREFIX}/response/pause")
    finally:
        plc.disconnect()
        plc.loop_stop()
        proc.terminate()
    finish(proc)


def test_the_documented_acl_lets_the_plc_command_and_refuses_a_reader(
        mosquitto_factory, subscribers, padim_bundle, sample_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """docs/mosquitto.acl as shipped (station plant/line7, Sparkplug node line7-cam1): the agent
    serves, the PLC's trigger is answered on its reply tree, a read-only user's trigger is refused."""
    passwords = tmp_path / "passwords"
    for user in ("agent-line7", "plc-line7", "dashboard"):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if user == "agent-line7" else []), str(passwords), user,
                        f"pw-{user}"], check=True, capture_output=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {passwords}\n"
                               f"acl_file {REPO / 'docs' / 'mosquitto.acl'}\n")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(min((sample_data / "test" / "good").iterdir()), images / "part.png")
    dashboard = subscribers(broker, prefix=PREFIX, username="dashboard", password="pw-dashboard")
    proc = start_agent(write_config(
        tmp_path, broker, padim_bundle.path, {"kind": "trigger", "image_root": str(images)},
        {"commands": True, "username": "agent-line7", "password_env": "AGENT_PASSWORD",
         "sparkplug": {"enabled": True, "group_id": "inspection", "edge_node_id": "line7-cam1"}}),
        env={"AGENT_PASSWORD": "pw-agent-line7"})
    plc = Plc(broker, username="plc-line7", password="pw-plc-line7", replies="plc/line7/replies/plc1")
    try:
        dashboard.wait_for(lambda: any(json.loads(m.payload)["state"] == "online"
                                       for m in dashboard.on(f"{PREFIX}/status")), "the agent online")
        answer = plc.ask("trigger", {"part_id": "ACL-1", "image_path": "part.png"})
        assert answer["ok"] and answer["verdict"]["part_id"] == "ACL-1"
        dashboard.wait_for(lambda: dashboard.on(f"{PREFIX}/last_result"), "last_result for a reader")

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{PREFIX}/response/dashboard"
        info = dashboard.client.publish(f"{PREFIX}/cmd/pause", "{}", qos=1, properties=props)
        info.wait_for_publish(WAIT_S)
        assert plc.ask("trigger", {"part_id": "ACL-2", "image_path": "part.png"})["ok"]  # not paused
        assert [json.loads(m.payload)["part_id"] for m in dashboard.on(f"{PREFIX}/verdict")] == ["ACL-1", "ACL-2"]
        assert not dashboard.on(f"{PREFIX}/response/dashboard")
    finally:
        plc.close()
        proc.terminate()
    finish(proc)
    denied = [line for line in (broker.workdir / "mosquitto.log").read_text().splitlines() if "Denied" in line]
    assert len(denied) == 1 and "'plant/line7/cmd/pause'" in denied[0], denied  # the agent was denied nothing
