"""Delivery of verdicts and images to the plant over MQTT (paho-mqtt 2.x).

JSON topics, under ``prefix = mqtt.topic_prefix`` (e.g. ``inspection/line1``):

``{prefix}/verdict``
    One UTF-8 JSON verdict per frame, schema ``agent/verdict.schema.json``; QoS ``mqtt.qos``
    (1 by default), not retained. MQTT 5: content type ``application/json``.
``{prefix}/status``
    Retained JSON ``{"state": "online" | "offline", "client_id": ..., "agent": ...,
    "model_id": ..., "model_version": ..., "reason": ..., "timestamp": ...}`` (epoch seconds);
    "online" on every connect, with ``"last_outage": {"seconds": ..., "reason": ...}`` after a
    broker outage; "offline" with reason "stopped" on a clean stop. The Last Will, which the
    broker publishes when the agent dies or its connection drops, is the "offline" message with
    reason "connection lost" and no timestamp: its content is fixed when the agent connects,
    long before the broker sends it.
``{prefix}/last_result``
    Retained: the latest verdict's JSON (``mqtt.last_result``), so a PLC or HMI that connects
    sees the station's last result at once; spooled in the verdict's transaction (a newer one
    replaces an unsent older one), QoS ``mqtt.qos``.
``{prefix}/heartbeat``
    ``{"seq": n, "state": "serving" | "paused" | ..., "timestamp": ...}`` every ``mqtt.heartbeat_s``
    from the inspection loop (so it stops when the loop hangs), QoS 0, not retained: a PLC
    watchdog checks that ``seq`` keeps changing.
``{prefix}/cmd/<name>`` (inbound) and responses
    See agent/commands.py: the trigger, reload, pause and resume commands; each is answered on
    the request's MQTT 5 response topic with its correlation data (else on
    ``{prefix}/response/<name>``).
``{prefix}/health``
    Periodic JSON from the health module (every ``mqtt.health_interval_s``); QoS 0, retained
    (a dashboard that subscribes sees the latest at once), not spooled: a missed health message
    is superseded by the next one.

Image topics, under ``image_prefix = mqtt.image_prefix`` (``images/{prefix}`` by default), a
tree of its own, so a ``{prefix}/#`` subscriber gets JSON only (agent/overlay.py makes them):

``{image_prefix}/{status}/{frame_id}``
    The image (``mqtt.image``: overlay or heatmap) of the frames ``mqtt.images`` names (ng,
    all or none; status is ``ok`` or ``ng``, an error verdict has no image), PNG or JPEG
    (``mqtt.image_format``); same QoS as the verdict, not retained, spooled in the verdict's
    transaction and published right after it. In the topic level, ``% / + #`` and NUL of the
    frame id are percent-encoded (``%25 %2F %2B %23 %00``), so any URL-decoder gives it back.
``{image_prefix}/last_ng``
    Retained: the image (``mqtt.last_ng``) of the latest NG frame, for an HMI that shows the
    last reject; also spooled with its verdict (a newer one replaces an unsent older one).

MQTT 5 image messages carry content type ``image/png`` or ``image/jpeg``, correlation data =
frame id (UTF-8 bytes) and the user properties ``frame_id``, ``status`` and ``score`` (the
normalised score, 1.0 = the image threshold, as text). MQTT 3.1.1 has no properties: the
frame id and status are in the topic.

Store and forward: ``publish`` only writes to the on-disk spool (it never waits for the
network), a verdict and its images in one transaction; a sender thread hands spooled
items to paho in spool order while connected, at most ``WINDOW`` unacknowledged at a time,
and deletes each from the spool on its PUBACK. Nothing is given to paho while disconnected,
so paho's in-memory queue never holds more than the in-flight window; paho re-sends that
window itself after a reconnect (same message ids, DUP set) before anything newer, and
after a process restart the spool is replayed from its oldest item. Delivery is
at-least-once: integrators de-duplicate on frame id.

When the spool cannot be written (disk full, I/O error), ``publish`` still does not
raise: while connected it hands the verdict and images straight to paho (same QoS and
properties, counted as ``direct``; they may overtake older spooled items). While not
connected they wait in memory (at most ``HELD_MAX_BYTES``, oldest given up first) and go out
directly once the broker is back; what memory cannot hold, or still holds at stop, is counted
as ``lost``. Counts are of verdicts (images travel with their verdict). Inspection goes on
throughout. One WARNING when the spool starts failing, one line when a write works again.
The spool itself recovers from damage (see ``agent.spool``).

Logs stay quiet through an outage: one WARNING when it starts (a failed connect or a lost
connection), one INFO line when it ends (after how long, how much is spooled); a broker
that refuses the connection (bad credentials, not authorised) gets one ERROR per outage
naming broker, user name and reason. paho's own log lines, which repeat on every retry,
go to ``agent.mqtt.paho`` at DEBUG. ``Publisher.stats.state`` says the same for health:
"connecting" | "connected" | "disconnected" | "refused", with a reason and since when.
"""
from __future__ import annotations

import collections
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
from collections.abc import Callable
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, model_validator

from agent import overlay
from agent.overlay import ImageFormat, ImageKind
from agent.sparkplug import SparkplugSettings
from agent.spool import Message, Spool, SpoolWriteError, check_spool_path
from agent.verdict import Inspection
from engines.settings import ConfigPath, SettingError, Settings

__all__ = ["WINDOW", "ConnectionState", "MqttConfig", "Publisher", "PublisherStats", "check_files", "image_root",
           "image_topic", "last_ng_topic", "read_password", "tls_context"]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

# While the spool cannot be written and the broker is away, verdicts and images wait in memory
# up to this many bytes: a short outage on a full disk then loses nothing.
HELD_MAX_BYTES = 64 * 2**20

# Spooled messages handed to paho and not yet acknowledged. Small, because paho keeps
# these in memory only; large enough to keep a LAN link busy.
WINDOW = 16

_IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
_TOPIC_WILDCARDS = {"+", "#", "\0"}
_TOPIC_ESCAPES = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\0": "%00"}


class MqttConfig(Settings):
    host: str = Field("localhost", min_length=1, description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual with TLS)")
    topic_prefix: str = Field("inspection/line1", description="JSON topics: <prefix>/verdict, /status, /health")
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
    qos: int = Field(1, ge=1, le=2, description="verdict and image QoS (1 or 2)")
    images: Literal["ng", "all", "none"] = Field(
        "ng", description="frames whose image goes to <image_prefix>/<status>/<frame_id>: ng | all | none")
    image: ImageKind = Field("overlay", description="that image: overlay (heatmap over the frame, region boxes, "
                                                   "score) | heatmap")
    last_ng: Literal["overlay", "heatmap", "none"] = Field("overlay", description="retained image of the latest "
                                                                                  "NG frame on <image_prefix>/last_ng: "
                                                                                  "overlay | heatmap | none")
    image_prefix: str | None = Field(None, description="image topics' tree, apart from the JSON topics; null = "
                                                       "images/<topic_prefix>")
    image_format: ImageFormat = Field("png", description="png | jpeg")
    health_interval_s: float = Field(10.0, gt=0.0, description="period of <prefix>/health")
    last_result: bool = Field(True, description="publish each verdict also, retained, on <prefix>/last_result")
    heartbeat_s: float = Field(1.0, ge=0.0, description="period of <prefix>/heartbeat (QoS 0); 0 = none")
    commands: bool = Field(False, description="accept reload, pause and resume on <prefix>/cmd/<name> (a "
                                              "trigger source always listens on <prefix>/cmd/trigger); "
                                              "restrict who may publish there with the broker's ACL")
    reconnect_min_s: float = Field(1.0, gt=0.0, description="broker reconnect backoff, doubling ...")
    reconnect_max_s: float = Field(30.0, gt=0.0, description="... up to this")
    spool_path: ConfigPath = Field(Path("/var/lib/inspection-agent/spool.sqlite"),
                                   description="store-and-forward spool (SQLite)")
    spool_max_messages: int = Field(100_000, ge=1, description="spool bound; when full, oldest images go "
                                                               "first, then oldest verdicts")
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="spool bound in bytes (512 MiB)")
    sparkplug: SparkplugSettings = Field(default_factory=SparkplugSettings,
                                         description="Sparkplug B edge node on the same broker (README: integration)")

    @model_validator(mode="after")
    def _consistent(self) -> "MqttConfig":
        for key in ("topic_prefix", "image_prefix"):
            prefix = getattr(self, key)
            if prefix is not None and (not prefix or prefix.startswith("/") or prefix.endswith("/")
                                       or set(prefix) & _TOPIC_WILDCARDS):
                raise SettingError(key, f"expected a topic without wildcards or leading/trailing '/', got {prefix!r}")
        json_tree, image_tree = f"{self.topic_prefix}/", f"{image_root(self)}/"
        if json_tree.startswith(image_tree) or image_tree.startswith(json_tree):
            raise SettingError("image_prefix", f"expected a tree apart from topic_prefix {self.topic_prefix!r} (a "
                                               f"<prefix>/# subscriber must get JSON only), got {image_root(self)!r}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise SettingError("reconnect_max_s", f"expected at least reconnect_min_s ({self.reconnect_min_s}), "
                                                  f"got {self.reconnect_max_s}")
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingError("cert_file", "give both cert_file and key_file for a client certificate, or neither")
        if self.password_file is not None and self.password_env is not None:
            raise SettingError("password_file", "give one source for the password (password_file or "
                                                "password_env), not both")
        return self


ConnectionState = Literal["connecting", "connected", "disconnected", "refused"]


@dataclass(frozen=True)
class PublisherStats:
    connected: bool
    sent: int       # handed to paho from the spool, replays included
    acked: int      # acknowledged by the broker and deleted from the spool
    spooled: int    # waiting in the spool, in-flight ones included
    dropped: int    # dropped by the full spool's policy (this process)
    rejected: int   # refused by the broker (MQTT 5 reason code) or unpublishable; logged, deleted
    state: ConnectionState
    state_reason: str | None  # why not connected: "cannot connect", "connection lost: ...", "Not authorized"
    state_since: float        # epoch seconds
    direct: int     # verdicts published without the spool, which could not be written
    held: int       # verdicts waiting in memory: the spool failed while disconnected
    lost: int       # verdicts neither spooled nor published (memory full, or still held at stop)
    spool_quarantined: int  # damaged spool files moved aside
    spool_errors: int       # spool writes that failed


@dataclass(frozen=True)
class _State:
    name: ConnectionState
    reason: str | None
    since: float  # epoch seconds


@dataclass(frozen=True)
class _SpoolFailure:
    since: float  # monotonic
    direct: int   # the counts when it began
    lost: int


def image_root(cfg: MqttConfig) -> str:
    """The image topics' tree: ``mqtt.image_prefix``, or ``images/<topic_prefix>``."""
    return cfg.image_prefix if cfg.image_prefix is not None else f"images/{cfg.topic_prefix}"


def image_topic(cfg: MqttConfig, status: str, frame_id: str) -> str:
    return f"{image_root(cfg)}/{status}/{''.join(_TOPIC_ESCAPES.get(c, c) for c in frame_id)}"


def last_ng_topic(cfg: MqttConfig) -> str:
    return f"{image_root(cfg)}/last_ng"


class PasswordSource(Protocol):
    """Settings that name where a password comes from (the broker's, the OPC UA server's)."""
    password_file: Any
    password_env: str | None


def read_password(cfg: PasswordSource) -> str | None:
    """The password from ``password_file`` or ``password_env``; None when neither is set."""
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
    """The MQTT sink. ``identity`` (agent name, model id and version) goes into every status message;
    images are at most ``image_max_side`` long."""

    def __init__(self, cfg: MqttConfig, spool: Spool, identity: dict[str, str] | None = None,
                 image_max_side: int = overlay.MAX_SIDE) -> None:
        self.cfg = cfg
        self.spool = spool
        self.identity = dict(identity or {})
        self.image_max_side = image_max_side
        self.client_id = cfg.client_id or f"inspection-agent-{socket.gethostname()}"
        self._v5 = cfg.protocol == "5"
        self._topic_verdict = f"{cfg.topic_prefix}/verdict"
        self._topic_status = f"{cfg.topic_prefix}/status"
        self._topic_health = f"{cfg.topic_prefix}/health"
        self._topic_last_result = f"{cfg.topic_prefix}/last_result"
        self._topic_heartbeat = f"{cfg.topic_prefix}/heartbeat"
        self._heartbeats = 0
        self._handlers: dict[str, Callable[[mqtt.MQTTMessage], None]] = {}  # inbound topic -> handler
        self._client = self._make_client(read_password(cfg))

        self._connected = threading.Event()    # set once the broker acknowledged "online"
        self._state = _State("connecting", None, time.time())  # replaced whole: stats reads it
        self._online_mid: int | None = None    # network thread only, as are the outage fields
        self._outage_since: float | None = None  # monotonic; None while connected
        self._outage_reason = ""
        self._refusal_logged = False
        self._direct = self._lost = 0
        self._held: collections.deque[list[Message]] = collections.deque()  # a verdict with its images
        self._held_bytes = 0
        self._held_lock = threading.Lock()     # inspection thread adds, sender thread publishes
        self._spool_failure: _SpoolFailure | None = None
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

    def publish(self, inspection: Inspection) -> None:
        """Spool the verdict and its images (as ``mqtt.images`` and ``mqtt.last_ng`` ask) together;
        returns without waiting for the network. Never raises for the spool: when it cannot be
        written, they are published directly (connected) or counted as lost (not connected)."""
        images = self._images(inspection)  # first: their time goes into the verdict's timings
        verdict = inspection.verdict
        body = verdict.to_json().encode()
        messages = [Message(self._topic_verdict, body, self.cfg.qos, kind="verdict"), *images]
        if self.cfg.last_result:
            messages.append(Message(self._topic_last_result, body, self.cfg.qos, retain=True, kind="last_result"))
        try:
            self.spool.put_many(messages)
        except SpoolWriteError as e:
            self._publish_without_spool(messages, e)
        else:
            self._spool_writable()
        self._wake.set()

    def publish_health(self, payload: dict[str, Any]) -> bool:
        """Publish one health message if connected (QoS 0, retained, not spooled); True when handed over."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(self._topic_health, json.dumps(payload, separators=(",", ":")),
                                    qos=0, retain=True, properties=self._json_properties())
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_heartbeat(self, state: str) -> bool:
        """One heartbeat if connected (QoS 0, not retained, not spooled); True when handed over."""
        if not self._connected.is_set():
            return False
        self._heartbeats += 1
        payload = {"seq": self._heartbeats, "state": state, "timestamp": round(time.time(), 3)}
        info = self._client.publish(self._topic_heartbeat, json.dumps(payload, separators=(",", ":")), qos=0,
                                    properties=self._json_properties())
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def subscribe(self, topic: str, handler: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Call ``handler`` (on the network thread; it must not block) for each message on ``topic``;
        subscribed (QoS 1) on every connect. Before ``start``."""
        self._handlers[topic] = handler

    def respond(self, topic: str, payload: dict[str, Any], correlation: bytes | None = None) -> bool:
        """Answer a command (QoS 1, not retained, not spooled: a requester that is gone needs no answer);
        True when handed to paho."""
        props = self._json_properties()
        if props is not None and correlation is not None:
            props.CorrelationData = correlation
        info = self._client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, properties=props)
        return info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Flush the spool for up to ``timeout_s``, publish "offline", disconnect.

        Returns True when the spool is empty; what is left stays on disk for the next start.
        A second call returns the first call's result.
        """
        if self._stopped is not None:
            return self._stopped
        deadline = time.monotonic() + timeout_s
        if self._started:
            while (len(self.spool) or self._held) and time.monotonic() < deadline:
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
            self._set_state("disconnected", "stopped")
        with self._held_lock:
            if self._held:
                log.warning("MQTT: stopped with %d verdict(s) held in memory (the spool could not take them): "
                            "lost", len(self._held))
                self._lost += len(self._held)
                self._held.clear()
                self._held_bytes = 0
        left = len(self.spool)
        if left:
            log.warning("MQTT: stopped with %d message(s) still spooled in %s; they are sent at next start",
                        left, self.spool.path)
        self._stopped = left == 0
        return self._stopped

    @property
    def stats(self) -> PublisherStats:
        state = self._state
        return PublisherStats(connected=self._connected.is_set(), sent=self._sent, acked=self._acked,
                              spooled=len(self.spool), dropped=self.spool.dropped, rejected=self._rejected,
                              state=state.name, state_reason=state.reason, state_since=state.since,
                              direct=self._direct, held=len(self._held), lost=self._lost,
                              spool_quarantined=self.spool.quarantined,
                              spool_errors=self.spool.write_errors)

    # -- images (inspection thread) ---------------------------------------------------

    def _images(self, inspection: Inspection) -> list[Message]:
        """The image messages of one inspection, each kind rendered once; their time is the verdict's
        ``image`` stage. A failure costs the images, never the verdict."""
        verdict = inspection.verdict
        wanted: list[tuple[str, bool, ImageKind]] = []  # topic, retained, kind
        per_frame = {"all": verdict.status != "error", "ng": verdict.status == "ng", "none": False}[self.cfg.images]
        if per_frame:
            wanted.append((image_topic(self.cfg, verdict.status, verdict.frame_id), False, self.cfg.image))
        if verdict.status == "ng" and self.cfg.last_ng != "none":
            wanted.append((last_ng_topic(self.cfg), True, self.cfg.last_ng))
        if not wanted:
            return []
        t = time.perf_counter()
        try:
            encoded: dict[str, bytes | None] = {}
            for _, _, kind in wanted:
                if kind not in encoded:
                    image = overlay.render(inspection, kind, self.image_max_side)
                    encoded[kind] = None if image is None else overlay.encode(image, self.cfg.image_format)
        except Exception:  # the verdict matters more than its picture
            log.exception("frame %s: image rendering failed; verdict sent without it", verdict.frame_id)
            return []
        finally:
            verdict.timings_ms["image"] = (time.perf_counter() - t) * 1000.0
        score = verdict.normalized_score if verdict.normalized_score is not None else verdict.image_score
        properties = (("frame_id", verdict.frame_id), ("status", verdict.status),
                      ("score", "" if score is None else f"{score:.4f}"))
        return [Message(topic, payload, self.cfg.qos, retain, kind="image", user_properties=properties)
                for topic, retain, kind in wanted if (payload := encoded[kind]) is not None]

    # -- when the spool cannot be written (inspection thread) ------------------------

    def _publish_without_spool(self, messages: list[Message], error: SpoolWriteError) -> None:
        if self._spool_failure is None:
            self._spool_failure = _SpoolFailure(time.monotonic(), self._direct, self._lost)
            log.warning("MQTT: %s; until it works again, verdicts and images go straight to the broker "
                        "while connected and wait in memory (up to %d MiB) while not", error,
                        HELD_MAX_BYTES >> 20)
        with self._held_lock:
            self._held.append(messages)
            self._held_bytes += sum(len(m.payload) for m in messages)
            while self._held_bytes > HELD_MAX_BYTES:
                given_up = self._held.popleft()
                self._held_bytes -= sum(len(m.payload) for m in given_up)
                self._lost += 1
        if self._connected.is_set():
            self._publish_held()

    def _publish_held(self) -> None:
        """Hand what waits in memory straight to paho (any thread; connected)."""
        with self._held_lock:
            while self._held and self._connected.is_set():
                messages = self._held.popleft()
                self._held_bytes -= sum(len(m.payload) for m in messages)
                for message in messages:
                    self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                                         properties=self._item_properties(message))
                self._direct += 1

    def _spool_writable(self) -> None:
        failure = self._spool_failure
        if failure is None:
            return
        self._spool_failure = None
        lost = self._lost - failure.lost
        log.log(logging.WARNING if lost else logging.INFO,
                "MQTT: spool %s writable again after %.0f s; meanwhile %d verdict(s) went directly to the "
                "broker and %d were lost", self.spool.path, time.monotonic() - failure.since,
                self._direct - failure.direct, lost)

    # -- paho setup and callbacks (network thread) ------------------------------------

    def _make_client(self, password: str | None) -> mqtt.Client:
        cfg = self.cfg
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311)
        client.on_log = _on_paho_log
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        # Room for the window plus status messages, so paho never queues a spooled item itself
        # (only while the spool fails can direct messages take the room).
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
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            self._refused(str(reason))
            return
        self._set_state("connecting", None)  # accepted; "connected" once "online" is acknowledged
        if self._handlers:
            client.subscribe([(topic, 1) for topic in self._handlers])
        # Spooled sending starts on this message's PUBACK: by then paho has queued its
        # re-sends of the previous connection's in-flight window, which keeps spool order.
        info = client.publish(self._topic_status, self._online_payload(), qos=1, retain=True)
        self._online_mid = info.mid

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho does not pass the cause; with TLS it is often the certificate (ca_file, hostname).
        self._set_state("disconnected", "cannot connect")
        if self._outage_begins("cannot connect"):
            log.warning("MQTT: cannot connect to broker %s:%d (down, unreachable, or TLS handshake failed); "
                        "spooling to %s and retrying every %g..%g s", self.cfg.host, self.cfg.port,
                        self.spool.path, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self._connected.clear()
        self._online_mid = None
        if self._stopping.is_set() or self._state.name == "refused":
            return  # a clean stop, or paho closing a refused connection: both told already
        self._set_state("disconnected", f"connection lost: {reason}")
        if self._outage_begins(f"connection lost: {reason}"):
            log.warning("MQTT: lost the connection to %s:%d (%s); spooling to %s and retrying every %g..%g s",
                        self.cfg.host, self.cfg.port, reason, self.spool.path, self.cfg.reconnect_min_s,
                        self.cfg.reconnect_max_s)

    def _refused(self, reason: str) -> None:
        self._set_state("refused", reason)
        self._outage_begins(f"refused: {reason}")
        if self._refusal_logged:
            return
        self._refusal_logged = True
        user = "no user name" if self.cfg.username is None else f"user name {self.cfg.username!r}"
        log.error("MQTT: broker %s:%d refused the connection (%s): %s; check the user name, password and the "
                  "broker's ACL; spooling to %s and retrying every %g..%g s", self.cfg.host, self.cfg.port, user,
                  reason, self.spool.path, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)

    def _outage_begins(self, reason: str) -> bool:
        """True for the first failure since the last connection: the one that is logged."""
        if self._outage_since is not None:
            return False
        self._outage_since = time.monotonic()
        self._outage_reason = reason
        return True

    def _online(self) -> None:
        if self._outage_since is None:
            log.info("MQTT: connected to %s:%d; %d message(s) spooled", self.cfg.host, self.cfg.port,
                     len(self.spool))
        else:
            log.info("MQTT: reconnected to %s:%d after %.1f s (%s); %d message(s) spooled", self.cfg.host,
                     self.cfg.port, time.monotonic() - self._outage_since, self._outage_reason, len(self.spool))
        self._outage_since = None
        self._refusal_logged = False
        self._set_state("connected", None)
        self._connected.set()

    def _set_state(self, name: ConnectionState, reason: str | None) -> None:
        since = self._state.since if name == self._state.name else time.time()
        self._state = _State(name, reason, since)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        if mid == self._online_mid:
            if reason.is_failure:
                log.error("MQTT: broker refused the status message on %s: %s", self._topic_status, reason)
            self._online()
        else:
            self._acks.put((mid, reason))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        handler = self._handlers.get(message.topic)
        if handler is None:
            return
        try:
            handler(message)
        except Exception:  # a bad command must not take the network thread down
            log.exception("MQTT: handling a message on %s failed", message.topic)

    # -- sender thread ---------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._settle_acks()
                if self._connected.is_set() and not self._stopping.is_set():
                    self._publish_held()
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
        info = self._client.publish(self._topic_status,
                                    self._status_payload("offline", "stopped", timestamp=round(time.time(), 3)),
                                    qos=1, retain=True)
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError) as e:
            log.warning("MQTT: could not publish offline status: %s", e)

    def _online_payload(self) -> str:
        fields: dict[str, Any] = {"timestamp": round(time.time(), 3)}
        if self._outage_since is not None:
            fields["last_outage"] = {"seconds": round(time.monotonic() - self._outage_since, 1),
                                     "reason": self._outage_reason}
        return self._status_payload("online", **fields)

    def _status_payload(self, state: str, reason: str | None = None, **fields: Any) -> str:
        body: dict[str, Any] = {"state": state, "client_id": self.client_id, **self.identity}
        if reason is not None:
            body["reason"] = reason
        body.update(fields)
        return json.dumps(body, separators=(",", ":"))

    def _json_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1  # UTF-8 text
        return props

    def _item_properties(self, message: Message) -> Properties | None:
        if not self._v5:
            return None
        if message.kind in ("verdict", "last_result"):
            return self._json_properties()
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = _image_type(message.payload)
        user = dict(message.user_properties)
        if "frame_id" in user:
            props.CorrelationData = user["frame_id"].encode()
        if message.user_properties:
            props.UserProperty = list(message.user_properties)
        return props


def _on_paho_log(client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
    # All at DEBUG: while the broker is away paho repeats an ERROR on every retry ("Client is
    # not connected"), and the Publisher's callbacks already report each change once.
    _paho_log.debug("%s", buf)


def _image_type(data: bytes) -> str:
    # From the bytes, not the settings: a spool replayed after a change of image_format holds both.
    for magic, mime in _IMAGE_TYPES.items():
        if data[:len(magic)] == magic:
            return mime
    return "application/octet-stream"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
