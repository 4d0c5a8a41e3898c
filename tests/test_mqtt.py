"""MQTT delivery against a real mosquitto: verdicts, images, status/Last Will, outages, restarts, auth."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator

from agent.mqtt import MqttConfig, Publisher, image_root, image_topic, last_ng_topic, read_password
from agent.spool import Spool
from agent.verdict import Inspection, ModelInfo, Region, Verdict

from mqtt_client import PREFIX, WAIT_S, wait_until

REPO = Path(__file__).resolve().parents[1]


def make_verdict(i: int, frame_id: str | None = None) -> Verdict:
    """Every third one NG (i = 0, 3, 6 ...), with a region."""
    ng = i % 3 == 0
    return Verdict(frame_id=frame_id or f"f{i:05d}", seq=i, source="cam1", timestamp=time.time(),
                   status="ng" if ng else "ok", model=ModelInfo("bracket", "1", "padim"),
                   image_score=9.0 if ng else 1.0, threshold=5.0, normalized_score=1.8 if ng else 0.2,
                   pixel_threshold=4.0, regions=[Region(4, 5, 6, 7, 30, 9.5)] if ng else [])


def make_inspection(i: int, frame_id: str | None = None) -> Inspection:
    """A verdict with a 48 x 64 frame and its score map: it has images."""
    frame = ((np.arange(48)[:, None] * 3 + np.arange(64)[None, :] * 2 + i) % 256).astype(np.uint8)
    score_map = np.full((48, 64), 2.0, np.float32)
    score_map[5:12, 4:10] = 9.5
    return Inspection(make_verdict(i, frame_id), cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR), score_map)


def verdict_only(i: int) -> Inspection:
    return Inspection(make_verdict(i))


def config(broker: Any, tmp_path: Path, **overrides: Any) -> MqttConfig:
    values: dict[str, Any] = dict(host=broker.host, port=broker.port, topic_prefix=PREFIX,
                                  client_id="agent-under-test", reconnect_min_s=0.1, reconnect_max_s=0.5,
                                  spool_path=tmp_path / "spool.sqlite",
                                  # The counts below are of a verdict's messages; test_plc covers last_result.
                                  last_result=False)
    values.update(overrides)
    return MqttConfig(**values)


@pytest.fixture
def publishers() -> Iterator[Callable[[MqttConfig], Publisher]]:
    made: list[Publisher] = []

    def make(cfg: MqttConfig, identity: dict[str, str] | None = None) -> Publisher:
        pub = Publisher(cfg, Spool(cfg.spool_path, cfg.spool_max_messages, cfg.spool_max_bytes), identity)
        made.append(pub)
        pub.start()
        return pub

    yield make
    for pub in made:
        pub.stop(timeout_s=1.0)
        pub.spool.close()


# A publisher in its own process, to be killed with SIGKILL. It publishes N verdicts (every
# other one with an image), waits as ``mode`` says, prints its stats as JSON, then idles.
# Modes: "no" (no wait), "connected", "sent:K" (first connects, prints "connected", reads a
# line from stdin, then publishes and waits until K messages were handed to paho).
_CHILD = """
import json, sys, time, dataclasses
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from tests.test_mqtt import make_inspection, verdict_only
from agent.mqtt import MqttConfig, Publisher
from agent.spool import Spool
host, port, spool_path, n, mode = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
cfg = MqttConfig(host=host, port=port, topic_prefix="%s", client_id="agent-child", images="all",
                 last_ng="none", last_result=False, reconnect_min_s=0.1, reconnect_max_s=0.5, spool_path=spool_path)
pub = Publisher(cfg, Spool(spool_path, cfg.spool_max_messages, cfg.spool_max_bytes))
pub.start()
while mode != "no" and not pub.stats.connected:
    time.sleep(0.02)
if mode.startswith("sent:"):
    print("connected", flush=True)
    sys.stdin.readline()
for i in range(n):
    pub.publish(make_inspection(i) if i %% 2 else verdict_only(i))
while mode.startswith("sent:") and pub.stats.sent < int(mode[5:]):
    time.sleep(0.02)
print(json.dumps(dataclasses.asdict(pub.stats)), flush=True)
time.sleep(600)
""" % PREFIX


class Child:
    def __init__(self, broker: Any, spool_path: Path, n: int, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO), broker.host, str(broker.port),
                                      str(spool_path), str(n), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise AssertionError(f"publisher child exited with {self.proc.returncode} before reporting")
        return line.decode()

    def stats(self) -> dict[str, Any]:
        return json.loads(self.readline())

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def kill_9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# -- tests ---------------------------------------------------------------------------


def test_every_verdict_arrives_once_with_a_valid_payload(mosquitto: Any, subscribers: Any, publishers: Any,
                                                         tmp_path: Path) -> None:
    sub = subscribers(mosquitto)
    pub = publishers(config(mosquitto, tmp_path))
    n = 100
    for i in range(n):
        pub.publish(verdict_only(i))
    sub.wait_for(lambda: len(set(sub.verdict_ids())) == n, f"{n} verdicts")
    assert sub.verdict_ids() == [f"f{i:05d}" for i in range(n)]  # in order, no duplicates

    schema = json.loads((REPO / "agent" / "verdict.schema.json").read_text())
    for msg in sub.on(f"{PREFIX}/verdict"):
        Draft202012Validator(schema).validate(json.loads(msg.payload))
        assert msg.qos == 1 and not msg.retain
        assert msg.properties.ContentType == "application/json"

    wait_until(lambda: pub.stats.acked == n, "PUBACKs")
    stats = pub.stats
    assert stats.connected and stats.spooled == 0 and stats.sent == n and stats.dropped == 0


def test_images_go_to_their_own_tree_with_user_properties(mosquitto: Any, subscribers: Any, publishers: Any,
                                                          tmp_path: Path) -> None:
    cfg = config(mosquitto, tmp_path, images="all")
    plc = subscribers(mosquitto)  # <prefix>/#: JSON only
    hmi = subscribers(mosquitto, prefix=image_root(cfg))
    assert image_root(cfg) == f"images/{PREFIX}"
    pub = publishers(cfg)
    odd_id = "cam1/part#7+x%"  # characters that are special in MQTT topics
    pub.publish(make_inspection(3, frame_id=odd_id))  # NG
    pub.publish(make_inspection(1))                   # OK
    pub.publish(verdict_only(4))                      # no frame, no map: no image

    topics = {odd_id: image_topic(cfg, "ng", odd_id), "f00001": image_topic(cfg, "ok", "f00001")}
    assert topics[odd_id] == f"images/{PREFIX}/ng/cam1%2Fpart%237%2Bx%25"
    hmi.wait_for(lambda: all(hmi.on(t) for t in topics.values()) and hmi.on(last_ng_topic(cfg)), "the images")
    plc.wait_for(lambda: len(plc.verdict_ids()) == 3, "the verdicts")
    assert {m.topic for m in plc.messages} <= {f"{PREFIX}/verdict", f"{PREFIX}/status"}
    for frame_id, topic in topics.items():
        (msg,) = hmi.on(topic)
        decoded = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape == (48, 64, 3)
        assert msg.qos == 1 and not msg.retain
        assert msg.properties.ContentType == "image/png"
        assert msg.properties.CorrelationData == frame_id.encode()
        status, score = ("ng", "1.8000") if frame_id == odd_id else ("ok", "0.2000")
        assert msg.properties.UserProperty == [("frame_id", frame_id), ("status", status), ("score", score)]
    assert len(hmi.messages) == 3  # nothing for the frame without an image

    late = subscribers(mosquitto, prefix=image_root(cfg))  # an HMI starting now: the retained last NG
    late.wait_for(lambda: late.on(last_ng_topic(cfg)), "the retained last NG")
    (last,) = late.on(last_ng_topic(cfg))
    assert last.retain and last.properties.CorrelationData == odd_id.encode()
    assert last.payload == hmi.on(topics[odd_id])[0].payload  # the same overlay
    verdicts = [json.loads(m.payload) for m in plc.on(f"{PREFIX}/verdict")]
    assert all("image" in v["timings_ms"] for v in verdicts[:2])  # the time it took is the verdict's
    assert pub.stop(timeout_s=10) is True


def test_images_of_ng_frames_only_by_default(mosquitto: Any, subscribers: Any, publishers: Any,
                                             tmp_path: Path) -> None:
    cfg = config(mosquitto, tmp_path, image="heatmap", last_ng="none", image_format="jpeg",
                 image_prefix="hmi/line1")
    hmi = subscribers(mosquitto, prefix="hmi/line1")
    pub = publishers(cfg)
    for i in range(6):
        pub.publish(make_inspection(i))
    hmi.wait_for(lambda: len(hmi.messages) == 2, "two NG images")
    assert [m.topic for m in hmi.messages] == ["hmi/line1/ng/f00000", "hmi/line1/ng/f00003"]
    assert all(m.properties.ContentType == "image/jpeg" for m in hmi.messages)
    assert pub.stop(timeout_s=10) is True
    assert not hmi.on(last_ng_topic(cfg))


def test_status_online_then_offline_after_stop(mosquitto: Any, subscribers: Any, publishers: Any,
                                               tmp_path: Path) -> None:
    identity = {"agent": "line7-cam1", "model_id": "bracket-0123", "model_version": "2025-01-02T03:04:05Z"}
    pub = publishers(config(mosquitto, tmp_path), identity)
    wait_until(lambda: pub.stats.connected, "connection")
    late = subscribers(mosquitto)  # subscribes after the fact: sees the retained status
    late.wait_for(lambda: late.on(f"{PREFIX}/status"), "retained online")
    (online,) = late.on(f"{PREFIX}/status")
    body = json.loads(online.payload)
    assert online.retain and abs(body.pop("timestamp") - time.time()) < WAIT_S
    assert body == {"state": "online", "client_id": "agent-under-test", **identity}  # no outage before it

    assert pub.publish_health({"fps": 12.5, "spool": pub.stats.spooled})
    late.wait_for(lambda: late.on(f"{PREFIX}/health"), "health")
    assert json.loads(late.on(f"{PREFIX}/health")[0].payload) == {"fps": 12.5, "spool": 0}

    pub.publish(verdict_only(1))
    assert pub.stop(timeout_s=10) is True
    assert pub.stats.spooled == 0 and not pub.stats.connected
    later = subscribers(mosquitto)
    later.wait_for(lambda: later.on(f"{PREFIX}/status") and later.on(f"{PREFIX}/health"),
                   "retained offline and health")
    (offline,) = later.on(f"{PREFIX}/status")
    body = json.loads(offline.payload)
    assert offline.retain and body["state"] == "offline" and body["reason"] == "stopped"
    assert body["agent"] == "line7-cam1" and body["model_version"] == identity["model_version"]
    assert abs(body["timestamp"] - time.time()) < WAIT_S
    (health,) = later.on(f"{PREFIX}/health")
    assert health.retain and json.loads(health.payload) == {"fps": 12.5, "spool": 0}
    assert pub.stats.state == "disconnected" and pub.stats.state_reason == "stopped"
    assert pub.publish_health({"fps": 0}) is False  # not connected: dropped, not queued


def test_last_will_offline_when_the_process_dies(mosquitto: Any, subscribers: Any, tmp_path: Path) -> None:
    sub = subscribers(mosquitto)
    child = Child(mosquitto, tmp_path / "spool.sqlite", 3, "connected")
    try:
        assert child.stats()["connected"]
        sub.wait_for(lambda: len(sub.verdict_ids()) == 3, "the child's verdicts")
        sub.wait_for(lambda: sub.on(f"{PREFIX}/status"), "online")
        assert json.loads(sub.on(f"{PREFIX}/status")[-1].payload)["state"] == "online"
    finally:
        child.kill_9()
    sub.wait_for(lambda: len(sub.on(f"{PREFIX}/status")) == 2, "the Last Will")
    will = json.loads(sub.on(f"{PREFIX}/status")[-1].payload)
    # No timestamp: the will is fixed at connect time, long before the broker sends it.
    assert will == {"state": "offline", "client_id": "agent-child", "reason": "connection lost"}


def test_broker_outage_mid_stream_loses_nothing(mosquitto: Any, subscribers: Any, publishers: Any,
                                                tmp_path: Path) -> None:
    # A persistent session, so the broker keeps what arrives while the subscriber reconnects.
    sub = subscribers(mosquitto, protocol=mqtt.MQTTv311, client_id="plc", persistent=True)
    pub = publishers(config(mosquitto, tmp_path))
    wait_until(lambda: pub.stats.connected, "connection")
    for i in range(0, 40):
        pub.publish(make_inspection(i) if i % 4 == 0 else verdict_only(i))
    mosquitto.stop()  # with messages still in flight
    wait_until(lambda: not pub.stats.connected, "the publisher to notice the outage")
    for i in range(40, 80):
        pub.publish(verdict_only(i))
    assert pub.stats.spooled >= 40
    mosquitto.start()
    for i in range(80, 120):
        pub.publish(verdict_only(i))

    expected = {f"f{i:05d}" for i in range(120)}
    sub.wait_for(lambda: set(sub.verdict_ids()) == expected, "all 120 verdicts")
    assert pub.stop(timeout_s=10) is True
    assert pub.stats.spooled == 0 and pub.stats.dropped == 0


def test_an_outage_logs_one_warning_and_one_recovery_line(mosquitto: Any, subscribers: Any, publishers: Any,
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # paho's own lines too: none of them may come out louder
    sub = subscribers(mosquitto, protocol=mqtt.MQTTv311, client_id="plc", persistent=True)
    pub = publishers(config(mosquitto, tmp_path))
    wait_until(lambda: pub.stats.connected, "connection")
    assert pub.stats.state == "connected" and pub.stats.state_reason is None
    for i in range(10):
        pub.publish(verdict_only(i))
    mosquitto.stop()
    wait_until(lambda: not pub.stats.connected, "the publisher to notice the outage")
    for i in range(10, 20):
        pub.publish(verdict_only(i))
    wait_until(lambda: _count(caplog, "Connection failed, retrying") >= 5, "five failed reconnects")
    stats = pub.stats
    assert stats.state == "disconnected" and stats.state_reason == "cannot connect"
    assert stats.state_since <= time.time()
    mosquitto.start()

    sub.wait_for(lambda: set(sub.verdict_ids()) == {f"f{i:05d}" for i in range(20)}, "all 20 verdicts")
    sub.wait_for(lambda: any("last_outage" in json.loads(m.payload) for m in sub.on(f"{PREFIX}/status")),
                 "the online status after the outage")
    # The last one: a subscriber that resubscribes gets the retained copy as well.
    online = json.loads(sub.on(f"{PREFIX}/status")[-1].payload)
    assert online["state"] == "online" and online["last_outage"]["seconds"] > 0
    assert online["last_outage"]["reason"].startswith("connection lost")
    assert pub.stats.state == "connected"

    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and loud[0].levelno == logging.WARNING, [r.getMessage() for r in loud]
    assert f"lost the connection to {mosquitto.host}:{mosquitto.port}" in loud[0].getMessage()
    (back,) = [r for r in caplog.records if "reconnected" in r.getMessage()]
    assert back.levelno == logging.INFO and re.search(r"after \d+\.\d s .* message\(s\) spooled", back.getMessage())


def _count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


def test_spool_of_a_killed_publisher_is_delivered_after_restart(mosquitto: Any, subscribers: Any,
                                                                publishers: Any, tmp_path: Path) -> None:
    spool_path = tmp_path / "spool.sqlite"
    mosquitto.stop()
    child = Child(mosquitto, spool_path, 20, "no")
    stats = child.stats()
    child.kill_9()
    assert stats["spooled"] == 30 and not stats["connected"]  # 20 verdicts, 10 images

    mosquitto.start()
    cfg = config(mosquitto, tmp_path, spool_path=spool_path)
    sub = subscribers(mosquitto, image_prefix=image_root(cfg))
    pub = publishers(cfg)
    pub.publish(verdict_only(99))  # new after the restart: must come after the replay
    sub.wait_for(lambda: len(sub.verdict_ids()) == 21 and len(sub.under(image_root(cfg))) == 10,
                 "the spooled verdicts and images")
    assert sub.verdict_ids() == [f"f{i:05d}" for i in range(20)] + ["f00099"]
    images = sub.under(image_root(cfg))
    assert [m.topic.rsplit("/", 1)[1] for m in images] == [f"f{i:05d}" for i in range(1, 20, 2)]
    # Replayed from the spool after a restart, with the user properties they were written with.
    assert [dict(m.properties.UserProperty)["frame_id"] for m in images] == [f"f{i:05d}" for i in range(1, 20, 2)]
    assert pub.stop(timeout_s=10) is True


def test_unacknowledged_messages_of_a_killed_publisher_are_replayed(mosquitto: Any, subscribers: Any,
                                                                     publishers: Any, tmp_path: Path) -> None:
    # Messages handed to the network but never acknowledged must survive in the spool.
    spool_path = tmp_path / "spool.sqlite"
    child = Child(mosquitto, spool_path, 10, "sent:15")  # 10 verdicts, 5 images
    try:
        assert child.readline().strip() == "connected"
        os.kill(mosquitto.pid, signal.SIGSTOP)  # takes bytes into its socket, never answers
        try:
            child.go()
            stats = child.stats()
        finally:
            mosquitto.kill()  # a crash: what it had not read is gone with it
    finally:
        child.kill_9()
    assert stats["sent"] == 15 and stats["acked"] == 0

    mosquitto.start()
    sub = subscribers(mosquitto)
    pub = publishers(config(mosquitto, tmp_path, spool_path=spool_path))
    sub.wait_for(lambda: len(sub.verdict_ids()) == 10, "the unacknowledged verdicts")
    assert sub.verdict_ids() == [f"f{i:05d}" for i in range(10)]
    assert pub.stop(timeout_s=10) is True


def test_mqtt_3_1_1(mosquitto: Any, subscribers: Any, publishers: Any, tmp_path: Path) -> None:
    cfg = config(mosquitto, tmp_path, protocol="3.1.1", images="all", last_ng="none")
    sub = subscribers(mosquitto, protocol=mqtt.MQTTv311, image_prefix=image_root(cfg))
    pub = publishers(cfg)
    for i in range(5):
        pub.publish(make_inspection(i))
    sub.wait_for(lambda: len(sub.verdict_ids()) == 5 and len(sub.under(image_root(cfg))) == 5,
                 "verdicts and images")
    decoded = cv2.imdecode(np.frombuffer(sub.on(image_topic(cfg, "ok", "f00004"))[0].payload, np.uint8),
                           cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3)
    assert pub.stop(timeout_s=10) is True


@pytest.fixture
def auth_broker(mosquitto_factory: Any, tmp_path: Path) -> Any:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd is not installed (it ships with the mosquitto package)")
    users = tmp_path / "users"
    subprocess.run([passwd, "-b", "-c", str(users), "agent", "s3cr3t-Pa55"], check=True, capture_output=True)
    subprocess.run([passwd, "-b", str(users), "plc", "plc-pw"], check=True, capture_output=True)
    return mosquitto_factory(f"allow_anonymous false\npassword_file {users}\n")


def test_username_password_from_file_never_logged(auth_broker: Any, subscribers: Any, publishers: Any,
                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cr3t-Pa55\n")
    sub = subscribers(auth_broker, username="plc", password="plc-pw")
    pub = publishers(config(auth_broker, tmp_path, username="agent", password_file=secret))
    pub.publish(verdict_only(1))
    sub.wait_for(lambda: sub.verdict_ids() == ["f00001"], "the verdict")
    assert pub.stop(timeout_s=10) is True

    assert any("CONNECT" in r.getMessage() for r in caplog.records)  # paho's packet log was captured
    for record in caplog.records:
        assert "s3cr3t" not in record.getMessage(), f"password logged by {record.name}"
    assert "s3cr3t" not in repr(pub.cfg)


def test_wrong_password_keeps_verdicts_spooled(auth_broker: Any, publishers: Any, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_MQTT_PASSWORD", "wrong-guess")
    pub = publishers(config(auth_broker, tmp_path, username="agent", password_env="TEST_MQTT_PASSWORD"))
    pub.publish(verdict_only(1))
    wait_until(lambda: _count(caplog, "Received CONNACK") >= 3, "three refused connections")

    # One clear line for the whole episode, not one per retry.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and loud[0].levelno == logging.ERROR, [r.getMessage() for r in loud]
    line = loud[0].getMessage()
    assert f"broker {auth_broker.host}:{auth_broker.port} refused the connection (user name 'agent')" in line
    stats = pub.stats
    # mosquitto 2 answers "Not authorized" to a wrong password; others say "Bad user name or password".
    assert stats.state == "refused" and stats.state_reason in ("Not authorized", "Bad user name or password")
    assert stats.state_reason in line
    assert not stats.connected and stats.spooled == 1
    assert all("wrong-guess" not in r.getMessage() for r in caplog.records)


@pytest.fixture
def tls_broker(mosquitto_factory: Any, tmp_path: Path) -> Any:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed; it makes the test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    broker = mosquitto_factory(f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n")
    broker.ca_file = d / "ca.crt"
    return broker


def test_tls_with_the_plant_ca(tls_broker: Any, subscribers: Any, publishers: Any, tmp_path: Path) -> None:
    sub = subscribers(tls_broker, ca_file=tls_broker.ca_file)
    pub = publishers(config(tls_broker, tmp_path, tls=True, ca_file=tls_broker.ca_file))
    pub.publish(verdict_only(1))
    sub.wait_for(lambda: sub.verdict_ids() == ["f00001"], "the verdict over TLS")
    assert pub.stop(timeout_s=10) is True


def test_tls_refuses_an_untrusted_broker(tls_broker: Any, publishers: Any, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    pub = publishers(config(tls_broker, tmp_path, tls=True))  # system CAs do not know the test CA
    pub.publish(verdict_only(1))
    wait_until(lambda: any("TLS handshake failed" in r.getMessage() for r in caplog.records), "the failure log")
    assert not pub.stats.connected and pub.stats.spooled == 1


def test_config_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="topic_prefix: expected a topic without wildcards"):
        MqttConfig(topic_prefix="plant/#")
    with pytest.raises(ValueError, match="reconnect_max_s: expected at least reconnect_min_s"):
        MqttConfig(reconnect_min_s=10, reconnect_max_s=1)
    with pytest.raises(ValueError, match="password_file.*missing"):
        read_password(MqttConfig(username="u", password_file=tmp_path / "missing"))
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_VAR"):
        read_password(MqttConfig(username="u", password_env="NO_SUCH_VAR"))
    with pytest.raises(ValueError, match="ca_file: file not found"):
        Publisher(MqttConfig(tls=True, ca_file=tmp_path / "ca.pem"), Spool(tmp_path / "s", 10, 1000))
    with pytest.raises(ValueError, match="image_prefix: expected a tree apart from topic_prefix"):
        MqttConfig(topic_prefix="plant/line1", image_prefix="plant/line1/images")
    with pytest.raises(ValueError, match="image_prefix: expected a tree apart from topic_prefix"):
        MqttConfig(topic_prefix="plant/line1/json", image_prefix="plant/line1")
    with pytest.raises(ValueError, match="image_prefix: expected a topic without wildcards"):
        MqttConfig(image_prefix="images/+")
    assert image_root(MqttConfig(topic_prefix="plant/line1", image_prefix="plant/line1-images")) == \
        "plant/line1-images"
