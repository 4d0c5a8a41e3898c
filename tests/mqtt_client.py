"""A separate paho client for tests: records everything under a topic prefix."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "test/line1"
WAIT_S = 30.0  # generous: a bound on a hang, not a performance claim


class Subscriber:
    """A separate paho client that records everything under PREFIX/# (and ``image_prefix``/# when given),
    in the order it arrives."""

    def __init__(self, broker: Any, protocol: int = mqtt.MQTTv5, client_id: str = "", prefix: str = PREFIX,
                 persistent: bool = False, username: str | None = None, password: str | None = None,
                 ca_file: Path | None = None, image_prefix: str | None = None) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.prefix = prefix
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        kwargs: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = not persistent
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.reconnect_delay_set(0.1, 0.5)
        topics = [f"{p}/#" for p in (prefix, image_prefix) if p is not None]
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "subscriber did not get its subscription"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def verdict_ids(self) -> list[str]:
        return [json.loads(m.payload)["frame_id"] for m in self.on(f"{self.prefix}/verdict")]

    def under(self, prefix: str) -> list[mqtt.MQTTMessage]:
        """Messages on topics under ``prefix``/, in arrival order."""
        with self._lock:
            return [m for m in self.messages if m.topic.startswith(f"{prefix}/")]

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        wait_until(condition, what)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def subscribers() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(broker: Any, **kwargs: Any) -> Subscriber:
        made.append(Subscriber(broker, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


