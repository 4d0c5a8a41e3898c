"""Delivery of verdicts and heatmaps to the plant over MQTT (paho-mqtt 2.x).

Topics, under ``prefix = mqtt.topic_prefix`` (e.g. ``inspection/line1``):

``{prefix}/verdict``
    One UTF-8 JSON verdict per frame, schema ``agent/verdict.schema.json``; QoS ``mqtt.qos``
    (1 by default), not retained. MQTT 5: content type ``application/json``.
``{prefix}/heatmap/{frame_id}``
    The frame's heatmap as a binary PNG or JPEG image; same QoS, not retained, published
    right after its verdict. MQTT 5: correlation data = frame id (UTF-8 bytes), content type
    ``image/png`` or ``image/jpeg``. In the topic level, ``% / + #`` and NUL of the frame id are
    percent-encoded (``%25 %2F %2B %23 %00``), so any URL-decoder gives back the frame id.
``{prefix}/status``
    Retained JSON ``{"state": "online" | "offline", "client_id": ..., "reason": ...}``;
    "online" on every connect, "offline" with reason "stopped" on a clean stop, and the
    same "offline" message with reason "connection lost" as the Last Will that the
    broker publishes when the agent dies or its connection drops.
``{prefix}/health``
    Periodic JSON from the health module (every ``mqtt.health_interval_s``); QoS 0, not
    retained, not spooled: a missed health message is superseded by the next one.

Store and forward: ``publish_verdict`` only writes to the on-disk spool (it never waits for
the network); a sender thread hands spooled items to paho in spool order while connected,
at most ``WINDOW`` unacknowledged at a time, and deletes each from the spool on its PUBACK.
Nothing is given to paho while disconnected, so paho's in-memory queue never holds more
than the in-flight window; paho re-sends that window itself after a reconnect (same message
ids, DUP set) before anything newer, and after a process restart the spool is replayed
from its oldest item. Delivery is at-least-once: integrators de-duplicate on frame id.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, model_validator

from agent.spool import Spool, SpoolItem, check_spool_path
from agent.verdict import Verdict
from engines.settings import ConfigPath, SettingError, Settings

log = logging.getLogger(__name__)

# Spooled messages handed to paho and not yet acknowledged. Small, because paho keeps
# these in memory only; large enough to keep a LAN link busy.
WINDOW = 16

_IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
_TOPIC_ESCAPES = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\0": "%00"}


class MqttConfig(Settings):
    host: str = Field("localhost", min_length=1, description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual with TLS)")
    topic_prefix: str = Field("inspection/line1", description="topics: <prefix>/verdict, /heatmap/<frame_id>, "
                                                              "/status, /health")
    client_id: str = Field("", description='"" = inspection-agent-<hostname>; unique per broker')
    protocol: Literal["5", "3.1.1"] = Field("5", description='"5" (MQTT 5) | "3.1.1"')
    tls: bool = Field(False, description="connect with TLS")
    ca_file: ConfigPath | None = Field(None, description="CA bundle for TLS; null = system store")
    cert_file: ConfigPath | None = Field(None, description="client certificate (mutual TLS)")
    key_file: ConfigPath | None = Field(None, description="client key (mutual TLS)")
    username: str | None = Field(None, description="broker user name")
    password_file: ConfigPath | None = Field(None, description="password is read from this file (first line) ...")
    password_env: str | None = Field(None, min_length=1, description="... or from this environment variable; "
                                                                     "never written in this file")
    keepalive: int = Field(30, ge=5, le=65535, description="seconds; the Last Will fires after 1.5x this on a "
                                                           "silent link")
    # QoS 0 has no acknowledgement to delete the spooled item on.
    qos: int = Field(1, ge=1, le=2, description="verdict and heatmap QoS (1 or 2)")
    heatmap_format: Literal["png", "jpeg"] = Field("png", description="png | jpeg")
    health_interval_s: float = Field(10.0, gt=0.0, description="period of <prefix>/health")
    reconnect_min_s: float = Field(1.0, gt=0.0, description="broker reconnect backoff, doubling ...")
    reconnect_max_s: float = Field(30.0, gt=0.0, description="... up to this")
    spool_path: ConfigPath = Field(Path("/var/lib/inspection-agent/spool.sqlite"),
                                   description="store-and-forward spool (SQLite)")
    spool_max_messages: int = Field(100_000, ge=1, description="spool bound; when full, oldest heatmaps go "
                                                               "first, then oldest verdicts")
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="spool bound in bytes (512 MiB)")

    @model_validator(mode="after")
    def _consistent(self) -> "MqttConfig":
        prefix = self.topic_prefix
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or set(prefix) & {"+", "#", "\0"}:
            raise SettingError("topic_prefix", f"expected a topic without wildcards or leading/trailing '/', "
                                               f"got {prefix!r}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise SettingError("reconnect_max_s", f"expected at least reconnect_min_s ({self.reconnect_min_s}), "
                                                  f"got {self.reconnect_max_s}")
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingError("cert_file", "give both cert_file and key_file for a client certificate, or neither")
        if self.password_file is not None and self.password_env is not None:
            raise SettingError("password_file", "give one source for the password (password_file or "
                                                "password_env), not both")
        return self


@dataclass(frozen=True)
class PublisherStats:
    connected: bool
    sent: int       # handed to paho, replays included
    acked: int      # acknowledged by the broker and deleted from the spool
    spooled: int    # waiting in the spool, in-flight ones included
    dropped: int    # dropped by the full spool's policy (this process)
    rejected: int   # refused by the broker (MQTT 5 reason code) or unpublishable; logged, deleted


def heatmap_topic(prefix: str, frame_id: str) -> str:
    return f"{prefix}/heatmap/{''.join(_TOPIC_ESCAPES.get(c, c) for c in frame_id)}"


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password from ``password_file`` or ``password_env``; None when neither is set."""
    if cfg.password_file is not None:
        try:
            lines = Path(cfg.password_file).read_text().splitlines()
        except OSError as e:
            raise SettingError("password_file", f"cannot read {cfg.password_file}: {e.strerror}") from None
        return lines[0] if lines else ""
    if cfg.password_env is not None:
        if cfg.password_env not in os.environ:
            raise SettingError("password_env", f"environment variable {cfg.password_env} is not set")
        return os.environ[cfg.password_env]
    return None


def check_files(cfg: MqttConfig) -> None:
    """Everything the connection needs from the machine: the password's source, TLS files that
    parse, a usable spool path. Raises SettingError naming the key."""
    read_password(cfg)
    if cfg.tls:
        tls_context(cfg)
    check_spool_path(cfg.spool_path)


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """The client's TLS context; a missing or unparsable CA, certificate or key is a SettingError."""
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_file():
            raise SettingError(key, f"file not found: {path}")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_str(cfg.ca_file))
    except (ssl.SSLError, OSError) as e:
        raise SettingError("ca_file", f"{cfg.ca_file}: not a usable CA bundle (PEM): {e}") from None
    if cfg.cert_file is not None:
        try:
            context.load_cert_chain(str(cfg.cert_file), _str(cfg.key_file))
        except (ssl.SSLError, OSError) as e:
            raise SettingError("cert_file", f"{cfg.cert_file} with key {cfg.key_file}: not a usable client "
                                            f"certificate and key (PEM): {e}") from None
    return context


class Publisher:
    def __init__(self, cfg: MqttConfig, spool: Spool) -> None:
        self.cfg = cfg
        self.spool = spool
        self.client_id = cfg.client_id or f"inspection-agent-{socket.gethostname()}"
        self._v5 = cfg.protocol == "5"
        self._topic_verdict = f"{cfg.topic_prefix}/verdict"
        self._topic_status = f"{cfg.topic_prefix}/status"
        self._topic_health = f"{cfg.topic_prefix}/health"
        self._client = self._make_client(read_password(cfg))

        self._connected = threading.Event()    # set once the broker acknowledged "online"
        self._online_mid: int | None = None    # network thread only
        self._unreachable_logged = False       # network thread only
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, ReasonCode]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}    # paho mid -> spool seq; sender thread only
        self._cursor = 0                       # last spool seq handed to paho; sender thread only
        self._sent = self._acked = self._rejected = 0
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._started = False
        self._stopped: bool | None = None      # stop()'s result, once stopped

    def start(self) -> None:
        """Connect in the background; verdicts are spooled until the broker is reachable."""
        if self._started:
            raise RuntimeError("Publisher.start() called twice")
        self._started = True
        log.info("MQTT: connecting to %s:%d as %r (MQTT %s%s), topics under %s/, spool %s with %d pending",
                 self.cfg.host, self.cfg.port, self.client_id, self.cfg.protocol,
                 ", TLS" if self.cfg.tls else "", self.cfg.topic_prefix, self.spool.path, len(self.spool))
        self._sender.start()
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()

    def publish_verdict(self, verdict: Verdict, heatmap: bytes | None = None) -> None:
        """Spool the verdict (and its encoded heatmap image); returns without touching the network."""
        if heatmap is not None:
            _image_type(heatmap)  # fail here, in the caller, not later in the sender
        self.spool.put(self._topic_verdict, verdict.to_json().encode(), qos=self.cfg.qos, kind="verdict")
        if heatmap is not None:
            self.spool.put(heatmap_topic(self.cfg.topic_prefix, verdict.frame_id), heatmap,
                           qos=self.cfg.qos, kind="heatmap")
        self._wake.set()

    def publish_health(self, payload: dict[str, Any]) -> bool:
        """Publish one health message if connected (QoS 0, not spooled); True when handed over."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(self._topic_health, json.dumps(payload, separators=(",", ":")),
                                    qos=0, properties=self._json_properties())
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Flush the spool for up to ``timeout_s``, publish "offline", disconnect.

        Returns True when the spool is empty; what is left stays on disk for the next start.
        A second call returns the first call's result.
        """
        if self._stopped is not None:
            return self._stopped
        deadline = time.monotonic() + timeout_s
        if self._started:
            while len(self.spool) and time.monotonic() < deadline:
                self._wake.set()
                time.sleep(0.02)
            self._stopping.set()
            self._wake.set()
            self._sender.join(timeout=max(1.0, deadline - time.monotonic()))
            if self._connected.is_set():
                self._publish_offline(max(0.5, deadline - time.monotonic()))
            self._connected.clear()
            self._client.disconnect()
            self._client.loop_stop()
        left = len(self.spool)
        if left:
            log.warning("MQTT: stopped with %d message(s) still spooled in %s; they are sent at next start",
                        left, self.spool.path)
        self._stopped = left == 0
        return self._stopped

    @property
    def stats(self) -> PublisherStats:
        return PublisherStats(connected=self._connected.is_set(), sent=self._sent, acked=self._acked,
                              spooled=len(self.spool), dropped=self.spool.dropped, rejected=self._rejected)

    # -- paho setup and callbacks (network thread) ------------------------------------

    def _make_client(self, password: str | None) -> mqtt.Client:
        cfg = self.cfg
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311)
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        # Room for the window plus status messages, so paho never queues a spooled item itself.
        client.max_inflight_messages_set(WINDOW + 4)
        client.will_set(self._topic_status, self._status_payload("offline", "connection lost"),
                        qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, password)
        if cfg.tls:
            client.tls_set_context(tls_context(cfg))
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("MQTT: broker %s:%d refused the connection: %s; retrying with backoff",
                      self.cfg.host, self.cfg.port, reason)
            return
        log.info("MQTT: connected to %s:%d; %d message(s) spooled", self.cfg.host, self.cfg.port,
                 len(self.spool))
        self._unreachable_logged = False
        # Spooled sending starts on this message's PUBACK: by then paho has queued its
        # re-sends of the previous connection's in-flight window, which keeps spool order.
        info = client.publish(self._topic_status, self._status_payload("online"), qos=1, retain=True)
        self._online_mid = info.mid

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._unreachable_logged:
            # paho does not pass the cause; with TLS it is often the certificate (ca_file, hostname).
            log.warning("MQTT: cannot connect to broker %s:%d (down, unreachable, or TLS handshake failed); "
                        "spooling to %s and retrying every %g..%g s",
                        self.cfg.host, self.cfg.port, self.spool.path, self.cfg.reconnect_min_s,
                        self.cfg.reconnect_max_s)
            self._unreachable_logged = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._online_mid = None
        if was_connected and not self._stopping.is_set():
            log.warning("MQTT: disconnected from %s:%d (%s); spooling until reconnected",
                        self.cfg.host, self.cfg.port, reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        if mid == self._online_mid:
            if reason.is_failure:
                log.error("MQTT: broker refused the status message on %s: %s", self._topic_status, reason)
            self._connected.set()
        else:
            self._acks.put((mid, reason))
        self._wake.set()

    # -- sender thread ---------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._settle_acks()
                if self._connected.is_set() and not self._stopping.is_set():
                    self._send_pending()
            except Exception:
                log.exception("MQTT sender: unexpected error; retrying in 1 s")
                time.sleep(1.0)
        self._settle_acks()

    def _settle_acks(self) -> None:
        done = []
        while True:
            try:
                mid, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # a status message, or already settled
            if reason.is_failure:
                log.error("MQTT: broker refused spooled message %d: %s; dropped", seq, reason)
                self._rejected += 1
            else:
                self._acked += 1
            done.append(seq)
        self.spool.ack(done)

    def _send_pending(self) -> None:
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for item in self.spool.pending(room, after_seq=self._cursor):
            if not self._connected.is_set():
                return  # the rest waits for the next connection
            self._cursor = item.seq
            try:
                info = self._client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain,
                                            properties=self._item_properties(item))
            except ValueError as e:  # e.g. an invalid topic: it can never be delivered
                log.error("MQTT: cannot publish spooled message %d on %r: %s; dropped", item.seq, item.topic, e)
                self._rejected += 1
                self.spool.ack([item.seq])
                continue
            # Even when the connection just dropped (rc NO_CONN), paho holds a QoS>0 message
            # and re-sends it after reconnecting, so it counts as in flight.
            self._inflight[info.mid] = item.seq
            self._sent += 1

    # -- payloads --------------------------------------------------------------------

    def _publish_offline(self, timeout_s: float) -> None:
        info = self._client.publish(self._topic_status, self._status_payload("offline", "stopped"),
                                    qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError) as e:
            log.warning("MQTT: could not publish offline status: %s", e)

    def _status_payload(self, state: str, reason: str | None = None) -> str:
        body: dict[str, Any] = {"state": state, "client_id": self.client_id}
        if reason is not None:
            body["reason"] = reason
        return json.dumps(body, separators=(",", ":"))

    def _json_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1  # UTF-8 text
        return props

    def _item_properties(self, item: SpoolItem) -> Properties | None:
        if not self._v5:
            return None
        if item.kind != "heatmap":
            return self._json_properties()
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = _image_type(item.payload)
        props.CorrelationData = unquote(item.topic.rsplit("/", 1)[1]).encode()
        return props


def _image_type(data: bytes) -> str:
    for magic, mime in _IMAGE_TYPES.items():
        if data[:len(magic)] == magic:
            return mime
    raise ValueError(f"heatmap: expected encoded PNG or JPEG bytes, got {len(data)} bytes "
                     f"starting {bytes(data[:8])!r}")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
