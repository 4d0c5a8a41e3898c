"""The agent as a Sparkplug B edge node (``mqtt.sparkplug``): one device per camera.

Topics (namespace ``spBv1.0``, group ``G``, edge node ``N`` = ``edge_node_id`` or the agent's
name, device ``D`` = ``device_id`` or the source's name):

``spBv1.0/G/NBIRTH/N``
    On every (re)connect and on a rebirth request: ``bdSeq`` (UInt64), ``Node Control/Rebirth``
    (Boolean, false), ``Node Info/Agent`` (String); ``seq`` 0.
``spBv1.0/G/DBIRTH/N/D``
    Right after: every device metric (``DEVICE_METRICS``) with its current value (null before
    the first verdict).
``spBv1.0/G/DDATA/N/D``
    One per verdict: the ``Verdict/*`` metrics, the counts, frames/s and the model, stamped
    with the frame's time. ``seq`` counts 0..255 over NBIRTH, DBIRTH and DDATA, then wraps.
``spBv1.0/G/NDEATH/N``
    The Last Will (QoS 1), carrying the ``bdSeq`` of the NBIRTH it ends: the broker publishes it
    when the agent dies or its link drops; a clean stop publishes it before disconnecting.
    ``bdSeq`` goes up by one on each new connection, across restarts too (``<spool_path>.bdseq``).
``spBv1.0/G/NCMD/N`` (inbound)
    ``Node Control/Rebirth`` = true: NBIRTH and DBIRTH again (seq from 0).
``spBv1.0/STATE/<primary_host_id>`` (inbound, Sparkplug 3.0)
    With ``primary_host_id`` set, the node is born only while that host's retained STATE says
    ``{"online": true, ...}``; when it goes offline the node publishes NDEATH, disconnects and
    connects again (a new bdSeq), waiting for the host. A STATE older (timestamp) than the
    last one seen is ignored.

NBIRTH, DBIRTH and DDATA go with QoS 0, not retained, as the specification requires. Store and
forward: each DDATA is written to its own spool (``spool_path``) first and deleted when paho
has written it to the connection, in order, after the births; what was spooled before the
current birth (a broker or host outage, a restart) is replayed with ``is_historical`` set on
its metrics, so a host stores it without updating its live tags. Being QoS 0, a message
written to the socket just before the link drops can still be lost; everything the node could
not write waits in the spool.

The connection uses the broker, TLS and credentials of the ``mqtt`` section with a client id
of its own (MQTT 3.1.1, clean session).
"""
from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import Field, field_validator

from agent.sparkplug_b import DataType, Payload
from agent.spool import Message, Spool, SpoolWriteError
from agent.verdict import Inspection, Verdict
from engines.settings import ConfigPath, Settings

if TYPE_CHECKING:
    from agent.mqtt import MqttConfig

__all__ = ["DEVICE_METRICS", "NODE_METRICS", "SparkplugNode", "SparkplugSettings", "SparkplugStats"]

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
WINDOW = 16  # DDATA handed to paho and not yet written

NODE_METRICS = {"bdSeq": DataType.UInt64, "Node Control/Rebirth": DataType.Boolean,
                "Node Info/Agent": DataType.String}
DEVICE_METRICS = {
    "Verdict/Status": DataType.String,             # ok | ng | error
    "Verdict/Image Score": DataType.Double,        # the model's units
    "Verdict/Normalized Score": DataType.Double,   # 1.0 = the image threshold
    "Verdict/Threshold": DataType.Double,
    "Verdict/Frame Id": DataType.String,
    "Verdict/Part Id": DataType.String,            # "" when no trigger named a part
    "Verdict/Regions": DataType.UInt32,
    "Verdict/Error": DataType.String,
    "Counts/Frames": DataType.UInt64,
    "Counts/OK": DataType.UInt64,
    "Counts/NG": DataType.UInt64,
    "Counts/Error": DataType.UInt64,
    "Performance/Frames per Second": DataType.Double,
    "Model/Id": DataType.String,
    "Model/Version": DataType.String,
}
_FPS_WINDOW_S = 10.0


class SparkplugSettings(Settings):
    enabled: bool = Field(False, description="also act as a Sparkplug B edge node (NBIRTH/DBIRTH/DDATA/NDEATH)")
    group_id: str = Field("inspection", min_length=1, description="Sparkplug group id")
    edge_node_id: str = Field("", description='edge node id; "" = agent.name')
    device_id: str = Field("", description='the camera\'s device id; "" = the source\'s name')
    primary_host_id: str | None = Field(None, description="Sparkplug 3.0 primary host application id: be born only "
                                                          "while its STATE is online; null = always")
    client_id: str = Field("", description='"" = <mqtt client id>-spb (as mqtt.client_id defaults: '
                                           'inspection-agent-<hostname>-spb); unique per broker')
    spool_path: ConfigPath | None = Field(None, description="DDATA store-and-forward spool; null = beside "
                                                            "mqtt.spool_path (<name>.sparkplug.sqlite)")
    spool_max_messages: int = Field(100_000, ge=1, description="spool bound; when full, oldest DDATA go first")

    @field_validator("group_id", "edge_node_id", "device_id", "primary_host_id")
    @classmethod
    def _topic_level(cls, v: str | None) -> str | None:
        if v is not None and set(v) & set("/+#\0"):
            raise ValueError(f"expected a topic level without '/', '+', '#', got {v!r}")
        return v


@dataclass(frozen=True)
class SparkplugStats:
    connected: bool
    born: bool        # NBIRTH/DBIRTH sent on this connection (and the primary host online)
    bdseq: int
    births: int       # NBIRTHs sent (reconnects and rebirths)
    sent: int         # DDATA written
    historical: int   # of which replayed with is_historical
    spooled: int
    dropped: int      # by the full spool's policy


def spool_path(cfg: "MqttConfig") -> Path:
    spb = cfg.sparkplug
    return Path(spb.spool_path) if spb.spool_path is not None else \
        Path(cfg.spool_path).with_suffix(".sparkplug.sqlite")


class SparkplugNode:
    """The Sparkplug sink: ``publish`` spools a DDATA, a sender thread births and sends."""

    def __init__(self, cfg: "MqttConfig", spool: Spool, node_id: str, device_id: str, agent: str) -> None:
        from agent.mqtt import read_password

        self.cfg = cfg
        self.spb = cfg.sparkplug
        self.spool = spool
        self.agent = agent
        group = self.spb.group_id
        self.topic_nbirth = f"{NAMESPACE}/{group}/NBIRTH/{node_id}"
        self.topic_ndeath = f"{NAMESPACE}/{group}/NDEATH/{node_id}"
        self.topic_ncmd = f"{NAMESPACE}/{group}/NCMD/{node_id}"
        self.topic_dbirth = f"{NAMESPACE}/{group}/DBIRTH/{node_id}/{device_id}"
        self.topic_ddata = f"{NAMESPACE}/{group}/DDATA/{node_id}/{device_id}"
        self.topic_state = None if self.spb.primary_host_id is None else f"{NAMESPACE}/STATE/{self.spb.primary_host_id}"
        self.client_id = self.spb.client_id or f"{cfg.client_id or f'inspection-agent-{socket.gethostname()}'}-spb"
        self._password = read_password(cfg)

        self._lock = threading.Lock()  # the current values: the inspection thread writes, the sender reads
        self._current: dict[str, Any] = {name: None for name in DEVICE_METRICS}
        self._counts = {"Counts/Frames": 0, "Counts/OK": 0, "Counts/NG": 0, "Counts/Error": 0}
        self._current.update(self._counts)
        self._recent: collections.deque[float] = collections.deque()  # monotonic times of recent verdicts

        self._bdseq_file = Path(f"{spool.path}.bdseq")
        self._bdseq = self._next_bdseq()
        self._seq = 0
        self._connected = threading.Event()
        self._born = False
        self._born_at = 0.0               # epoch seconds of the current birth
        self._rebirth = threading.Event()
        self._host_online = self.topic_state is None
        self._host_seen = 0               # timestamp of the latest STATE taken
        self._host_left = threading.Event()
        self._inflight: dict[int, tuple[int, bool]] = {}   # paho mid -> (spool seq, historical)
        self._written: collections.deque[int] = collections.deque()
        self._cursor = 0
        self._births = self._sent = self._historical = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._client = self._make_client()
        self._sender = threading.Thread(target=self._send_loop, name="sparkplug-sender", daemon=True)

    # -- the sink (inspection thread) -----------------------------------------------------

    def start(self) -> None:
        log.info("Sparkplug: edge node %s, device %s, as %r%s; %d DDATA spooled", self.topic_nbirth.split("/")[-1],
                 self.topic_ddata.split("/")[-1], self.client_id,
                 "" if self.topic_state is None else f", primary host {self.spb.primary_host_id}", len(self.spool))
        self._sender.start()
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()

    def publish(self, inspection: Inspection) -> None:
        verdict = inspection.verdict
        with self._lock:
            values = self._record(verdict)
        payload = _payload(values, _ms(verdict.timestamp))
        try:
            self.spool.put_many([Message(self.topic_ddata, payload.SerializeToString(), qos=0)])
        except SpoolWriteError as e:  # Sparkplug is a second channel; the JSON verdict has its own fallbacks
            log.warning("Sparkplug: %s; DDATA of frame %s not sent", e, verdict.frame_id)
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> bool:
        """Flush what is born and connected for up to ``timeout_s``, publish NDEATH, disconnect."""
        deadline = time.monotonic() + timeout_s
        while len(self.spool) and self._born and self._connected.is_set() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        self._stopping.set()
        self._wake.set()
        self._sender.join(timeout=max(0.5, deadline - time.monotonic()))
        if self._connected.is_set():
            info = self._client.publish(self.topic_ndeath, self._death(), qos=1)
            try:
                info.wait_for_publish(timeout=max(0.2, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self.spool.close()
        return True

    @property
    def stats(self) -> SparkplugStats:
        return SparkplugStats(connected=self._connected.is_set(), born=self._born, bdseq=self._bdseq,
                              births=self._births, sent=self._sent, historical=self._historical,
                              spooled=len(self.spool), dropped=self.spool.dropped)

    def _record(self, verdict: Verdict) -> dict[str, Any]:
        """Update the current values with one verdict; returns the DDATA's metrics."""
        now = time.monotonic()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > _FPS_WINDOW_S:
            self._recent.popleft()
        self._counts["Counts/Frames"] += 1
        self._counts[{"ok": "Counts/OK", "ng": "Counts/NG", "error": "Counts/Error"}[verdict.status]] += 1
        span = now - self._recent[0]
        values = {
            "Verdict/Status": verdict.status, "Verdict/Image Score": verdict.image_score,
            "Verdict/Normalized Score": verdict.normalized_score, "Verdict/Threshold": verdict.threshold,
            "Verdict/Frame Id": verdict.frame_id, "Verdict/Part Id": verdict.part_id or "",
            "Verdict/Regions": len(verdict.regions), "Verdict/Error": verdict.error or "", **self._counts,
            "Performance/Frames per Second": (len(self._recent) - 1) / span if span > 0 else 0.0,
            "Model/Id": verdict.model.id, "Model/Version": verdict.model.version,
        }
        self._current.update(values)
        return values

    # -- paho (network thread) ----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        from agent.mqtt import tls_context

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                             clean_session=True)
        client.reconnect_delay_set(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(WINDOW + 4)
        client.will_set(self.topic_ndeath, self._death(), qos=1, retain=False)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self._password)
        if self.cfg.tls:
            client.tls_set_context(tls_context(self.cfg))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("Sparkplug: broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        topics = [(self.topic_ncmd, 1)] + ([(self.topic_state, 1)] if self.topic_state else [])
        client.subscribe(topics)
        log.info("Sparkplug: connected (bdSeq %d)%s", self._bdseq,
                 "" if self.topic_state is None else f"; waiting for primary host {self.spb.primary_host_id}")
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._born = False
        if was_connected:
            # The next CONNECT carries a new death certificate: bdSeq counts connections.
            self._bdseq = self._next_bdseq()
            client.will_set(self.topic_ndeath, self._death(), qos=1, retain=False)
            if not self._stopping.is_set():
                log.warning("Sparkplug: connection lost (%s); DDATA spooled to %s", reason, self.spool.path)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._written.append(mid)
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topic_ncmd:
            self._on_ncmd(message.payload)
        elif message.topic == self.topic_state:
            self._on_state(message.payload)

    def _on_ncmd(self, data: bytes) -> None:
        try:
            payload = Payload.FromString(data)
        except Exception:
            log.warning("Sparkplug: NCMD that is no Sparkplug B payload ignored")
            return
        for metric in payload.metrics:
            if metric.name == "Node Control/Rebirth" and metric.boolean_value:
                log.info("Sparkplug: rebirth requested")
                self._rebirth.set()
                self._wake.set()

    def _on_state(self, data: bytes) -> None:
        try:
            state = json.loads(data)
            online, stamp = bool(state["online"]), int(state.get("timestamp", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("Sparkplug: STATE of %s is not Sparkplug 3.0 JSON: %r", self.spb.primary_host_id, data[:80])
            return
        if stamp < self._host_seen:
            return  # an older message than the one acted on
        self._host_seen = stamp
        if online != self._host_online:
            log.info("Sparkplug: primary host %s %s", self.spb.primary_host_id, "online" if online else "offline")
        self._host_online = online
        if not online and self._born:
            self._host_left.set()
        self._wake.set()

    # -- sender thread -----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                self._settle()
                if self._host_left.is_set():
                    self._leave()
                if not (self._connected.is_set() and self._host_online) or self._stopping.is_set():
                    continue
                if not self._born or self._rebirth.is_set():
                    self._birth()
                self._send_pending()
            except Exception:
                log.exception("Sparkplug sender: unexpected error; retrying in 1 s")
                time.sleep(1.0)

    def _birth(self) -> None:
        self._rebirth.clear()
        self._seq = 0
        self._inflight.clear()  # what was in flight is sent again after the births, in order
        self._cursor = 0
        self._born_at = time.time()
        now = _ms(self._born_at)
        node = _payload({"bdSeq": self._bdseq, "Node Control/Rebirth": False, "Node Info/Agent": self.agent}, now,
                        NODE_METRICS)
        with self._lock:
            device = _payload(dict(self._current), now)
        for topic, payload in ((self.topic_nbirth, node), (self.topic_dbirth, device)):
            payload.seq = self._next_seq()
            self._client.publish(topic, payload.SerializeToString(), qos=0)
        self._born = True
        self._births += 1
        log.info("Sparkplug: NBIRTH and DBIRTH sent (bdSeq %d)", self._bdseq)

    def _send_pending(self) -> None:
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for item in self.spool.pending(room, after_seq=self._cursor):
            if not (self._connected.is_set() and self._born) or self._rebirth.is_set():
                return
            payload = Payload.FromString(item.payload)
            historical = item.created < self._born_at
            if historical:
                for metric in payload.metrics:
                    metric.is_historical = True
            payload.seq = self._next_seq()
            info = self._client.publish(item.topic, payload.SerializeToString(), qos=0)
            self._cursor = item.seq
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self._inflight[info.mid] = (item.seq, historical)
            else:
                return  # not written: the next birth sends it again

    def _settle(self) -> None:
        done = []
        while self._written:
            mid = self._written.popleft()
            entry = self._inflight.pop(mid, None)
            if entry is not None:
                done.append(entry[0])
                self._sent += 1
                self._historical += entry[1]
        self.spool.ack(done)

    def _leave(self) -> None:
        """The primary host went offline: NDEATH, disconnect, connect again and wait for it."""
        self._host_left.clear()
        log.warning("Sparkplug: primary host %s offline; NDEATH, reconnecting to wait for it",
                    self.spb.primary_host_id)
        info = self._client.publish(self.topic_ndeath, self._death(), qos=1)
        try:
            info.wait_for_publish(timeout=2.0)
        except (RuntimeError, ValueError):
            pass
        self._client.disconnect()
        self._client.loop_stop()  # on_disconnect has run: a new bdSeq is in the will
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()

    def _next_bdseq(self) -> int:
        """The last bdSeq used (kept beside the spool, across restarts) + 1: a late NDEATH of an earlier
        process, sent when the broker notices the dead link, never matches the new NBIRTH."""
        try:
            last = int(self._bdseq_file.read_text())
        except (OSError, ValueError):
            last = -1
        bdseq = (last + 1) % 256
        try:
            self._bdseq_file.write_text(str(bdseq))
        except OSError as e:  # worth a warning, not an outage: the count then restarts at the next start
            log.warning("Sparkplug: cannot keep bdSeq in %s: %s", self._bdseq_file, e.strerror or e)
        return bdseq

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    def _death(self) -> bytes:
        return _payload({"bdSeq": self._bdseq}, _ms(time.time()), NODE_METRICS).SerializeToString()


def _payload(values: dict[str, Any], timestamp_ms: int, types: dict[str, int] = DEVICE_METRICS) -> Any:
    payload = Payload(timestamp=timestamp_ms)
    for name, value in values.items():
        metric = payload.metrics.add(name=name, timestamp=timestamp_ms, datatype=types[name])
        if value is None:
            metric.is_null = True
        elif types[name] == DataType.String:
            metric.string_value = str(value)
        elif types[name] == DataType.Double:
            metric.double_value = float(value)
        elif types[name] == DataType.Boolean:
            metric.boolean_value = bool(value)
        elif types[name] == DataType.UInt32:
            metric.int_value = int(value)
        else:
            metric.long_value = int(value)
    return payload


def _ms(t: float) -> int:
    return round(t * 1000)
