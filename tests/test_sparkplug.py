"""The Sparkplug B edge node end to end: the `run` command against a real Mosquitto, watched by an
independent Sparkplug host (mqtt-spb-wrapper, tests/sparkplug_host.py, in its own environment) and
by a raw MQTT subscriber that counts what was on the wire."""
from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.sparkplug import DEVICE_METRICS
from conftest import AGENTS
from mqtt_client import WAIT_S, wait_until
from test_service import PREFIX, start_agent, write_config

REPO = Path(__file__).resolve().parents[1]
HOST_PYTHON = Path(os.environ.get("SPARKPLUG_HOST_PYTHON", REPO / ".venv-sparkplug-host" / "bin" / "python"))
GROUP, NODE, DEVICE = "plant", "line7", "cam1"

pytestmark = pytest.mark.skipif(not HOST_PYTHON.exists(), reason=(
    f"no Sparkplug host environment at {HOST_PYTHON} (scripts/setup.sh makes it: mqtt-spb-wrapper needs "
    "paho-mqtt 1.x)"))


class Host:
    """tests/sparkplug_host.py in its own interpreter: what the library decoded, one record per message."""

    def __init__(self, broker: Any) -> None:
        self.proc = subprocess.Popen([str(HOST_PYTHON), str(REPO / "tests" / "sparkplug_host.py"), broker.host,
                                      str(broker.port), GROUP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        AGENTS.append(self.proc)  # killed after the test whatever happens
        self.seen: list[dict] = []
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(lambda: any(m["type"] == "ready" for m in self.messages()), "the Sparkplug host connected")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def messages(self, kind: str | None = None) -> list[dict]:
        while True:
            try:
                self.seen.append(json.loads(self._lines.get_nowait()))
            except queue.Empty:
                break
        return [m for m in self.seen if kind is None or m["type"] == kind]

    def rebirth(self, node: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"rebirth {node}\n")
        self.proc.stdin.flush()


class Wire:
    """A raw subscriber to the group: how many DDATA were published, whatever decodes them."""

    def __init__(self, broker: Any) -> None:
        self.ddata = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="wire")
        self.client.on_message = self._on_message
        done: list[bool] = []
        self.client.on_subscribe = lambda *a: done.append(True)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"spBv1.0/{GROUP}/DDATA/#")
        wait_until(lambda: done, "the wire subscription")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.ddata += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def metrics(message: dict) -> dict[str, Any]:
    return {m["name"]: m.get("value") for m in message["payload"].get("metrics", [])}


def config(tmp_path: Path, broker: Any, bundle: Any, **sparkplug: Any) -> Path:
    source = {"kind": "synthetic", "count": 0, "fps": 8, "size": [160, 192], "defect_rate": 0.5, "seed": 3}
    return write_config(tmp_path, broker, bundle.path, source, {
        "sparkplug": {"enabled": True, "group_id": GROUP, "edge_node_id": NODE, "device_id": DEVICE, **sparkplug}})


def test_host_sees_births_decodes_every_ddata_rebirths_and_sees_ndeath_after_sigkill(
        mosquitto, subscribers, padim_bundle, tmp_path: Path) -> None:  # noqa: F811
    host = Host(mosquitto)
    wire = Wire(mosquitto)
    sub = subscribers(mosquitto, prefix=PREFIX)
    proc = start_agent(config(tmp_path, mosquitto, padim_bundle))
    try:
        wait_until(lambda: host.messages("DBIRTH"), "NBIRTH and DBIRTH")
        (nbirth,) = host.messages("NBIRTH")
        assert nbirth["node"] == NODE and nbirth["payload"]["seq"] == "0"
        born = metrics(nbirth)
        assert born["Node Control/Rebirth"] is False and isinstance(born["bdSeq"], int)
        (dbirth,) = host.messages("DBIRTH")
        assert dbirth["device"] == DEVICE and set(metrics(dbirth)) == set(DEVICE_METRICS)
        assert dbirth["payload"]["seq"] == "1"

        wait_until(lambda: len(host.messages("DDATA")) >= 6, "six DDATA")
        host.rebirth(NODE)
        wait_until(lambda: len(host.messages("NBIRTH")) == 2 and len(host.messages("DBIRTH")) == 2, "the rebirth")
        assert host.messages("NBIRTH")[1]["payload"]["seq"] == "0"
        assert metrics(host.messages("NBIRTH")[1])["bdSeq"] == born["bdSeq"]  # same connection, same bdSeq
        wait_until(lambda: len(host.messages("DDATA")) >= 10, "DDATA after the rebirth")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: host.messages("NDEATH"), "NDEATH after SIGKILL")
    (ndeath,) = host.messages("NDEATH")
    assert ndeath["node"] == NODE and metrics(ndeath)["bdSeq"] == born["bdSeq"]

    wait_until(lambda: wire.ddata == len(host.messages("DDATA")), "the host to have every DDATA on the wire")
    ddata = host.messages("DDATA")
    assert wire.ddata == len(ddata)  # every DDATA published was decoded by the host
    for message in ddata:
        values = metrics(message)
        assert message["device"] == DEVICE and set(values) == set(DEVICE_METRICS)
        assert values["Verdict/Status"] in ("ok", "ng") and isinstance(values["Verdict/Image Score"], float)
        assert values["Model/Id"] == padim_bundle.manifest.model_id
        assert not any(m.get("isHistorical") for m in message["payload"]["metrics"])
    wait_until(lambda: {metrics(m)["Verdict/Frame Id"] for m in ddata} <= {
        json.loads(m.payload)["frame_id"] for m in sub.on(f"{PREFIX}/verdict")}, "the JSON verdicts of each DDATA")
    counts = [metrics(m)["Counts/Frames"] for m in ddata]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), "one DDATA per verdict, in order"
    # seq: +1 per message from each birth on, mod 256.
    order = [m for m in host.messages() if m["type"] in ("NBIRTH", "DBIRTH", "DDATA")]
    for before, after in itertools.pairwise(order):
        if after["type"] != "NBIRTH":
            assert int(after["payload"]["seq"]) == (int(before["payload"]["seq"]) + 1) % 256
    wire.close()

    # Restarted, the node's bdSeq goes on from the killed one's: its late NDEATH can never match.
    proc = start_agent(config(tmp_path, mosquitto, padim_bundle))
    try:
        wait_until(lambda: len(host.messages("NBIRTH")) == 3, "the NBIRTH after the restart")
        assert metrics(host.messages("NBIRTH")[2])["bdSeq"] == (born["bdSeq"] + 1) % 256
    finally:
        proc.terminate()
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-3000:]


def test_state_of_the_primary_host_gates_birth_and_spooled_ddata_replay_as_historical(
        mosquitto, subscribers, padim_bundle, tmp_path: Path) -> None:  # noqa: F811
    host = Host(mosquitto)
    sub = subscribers(mosquitto, prefix=PREFIX)
    scada = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="scada1")
    scada.connect(mosquitto.host, mosquitto.port)
    scada.loop_start()

    def state(online: bool) -> None:
        scada.publish("spBv1.0/STATE/scada1", json.dumps({"online": online, "timestamp": int(time.time() * 1000)}),
                      qos=1, retain=True).wait_for_publish(WAIT_S)

    proc = start_agent(config(tmp_path, mosquitto, padim_bundle, primary_host_id="scada1"))
    try:
        sub.wait_for(lambda: len(sub.on(f"{PREFIX}/verdict")) >= 4, "four verdicts while the host is away")
        assert not host.messages("NBIRTH"), "born without the primary host"
        state(True)
        wait_until(lambda: host.messages("DBIRTH") and any(
            not any(m.get("isHistorical") for m in d["payload"]["metrics"]) for d in host.messages("DDATA")),
            "births, the replay and a live DDATA")
        ddata = host.messages("DDATA")
        historical = [all(m.get("isHistorical") for m in d["payload"]["metrics"]) for d in ddata]
        assert sum(historical) >= 4 and historical == sorted(historical, reverse=True), historical
        first_bdseq = metrics(host.messages("NBIRTH")[0])["bdSeq"]

        time.sleep(0.002)  # a later timestamp than the online STATE
        state(False)
        wait_until(lambda: host.messages("NDEATH"), "NDEATH when the primary host goes offline")
        assert metrics(host.messages("NDEATH")[0])["bdSeq"] == first_bdseq
        state(True)
        wait_until(lambda: len(host.messages("NBIRTH")) == 2, "a new birth when the host is back")
        assert metrics(host.messages("NBIRTH")[1])["bdSeq"] == (first_bdseq + 1) % 256
    finally:
        scada.disconnect()
        scada.loop_stop()
        proc.terminate()
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-3000:]
    wait_until(lambda: len(host.messages("NDEATH")) == 2, "NDEATH on a clean stop")
