"""The PLC handshake end to end: the `run` command with a trigger source against a real Mosquitto;
a separate MQTT 5 client plays the PLC (trigger, reload, pause, resume, each with a response topic)."""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_client import subscribers, wait_until  # noqa: F401  (fixture)
from test_service import PREFIX, SCHEMA, finish, start_agent, write_config

REPLIES = "plc/station1/replies"


class Plc:
    """An MQTT 5 client that sends commands with a response topic and correlation data."""

    def __init__(self, broker: Any) -> None:
        self.replies: dict[bytes, dict] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plc", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed: list[bool] = []
        self.client.on_subscribe = lambda *a: subscribed.append(True)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(REPLIES, qos=1)
        wait_until(lambda: subscribed, "the PLC's subscription")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.replies[msg.properties.CorrelationData] = json.loads(msg.payload)

    def send(self, command: str, body: Any) -> bytes:
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = REPLIES
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
        plc.publish(f"{PREFIX}/cmd/trigger", json.dumps({"part_id": "P1", "image_path": "part.png",
                                                         "correlation_id": 17}), qos=1)
        sub.wait_for(lambda: sub.on(f"{PREFIX}/response/trigger"), "the answer on <prefix>/response/trigger")
        answer = json.loads(sub.on(f"{PREFIX}/response/trigger")[0].payload)
        assert answer["correlation_id"] == 17 and answer["verdict"]["part_id"] == "P1"
    finally:
        plc.disconnect()
        plc.loop_stop()
        proc.terminate()
    finish(proc)
