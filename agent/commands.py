"""Commands from the PLC/SCADA layer over MQTT: ``{prefix}/cmd/<name>``, each answered.

``{prefix}/cmd/trigger`` (listened to when the source is ``trigger``)
    ``{"part_id": "4711", "meta": {...}, "image_path": "..."}`` (meta and image_path optional;
    a bare JSON string or number is the part id). The answer, once the frame is judged, is
    ``{"command": "trigger", "ok": true, "part_id": ..., "verdict": {...}}``; a refused trigger
    (paused, queue full, no such file allowed) is answered at once with ``ok: false`` and
    ``error``. The verdict also goes to ``{prefix}/verdict`` and ``{prefix}/last_result``.
``{prefix}/cmd/reload`` (``mqtt.commands``)
    ``{"bundle": "/path"}`` or ``{}`` (the configured ``agent.model`` again, e.g. recalibrated in
    place): the new bundle is loaded, hash-checked and warmed up with one frame before the
    agent switches to it; on any failure the old one keeps serving and the answer says why.
``{prefix}/cmd/pause``, ``{prefix}/cmd/resume`` (``mqtt.commands``)
    Paused, the agent takes no frames (a triggered source keeps its frames; triggers are
    refused); the heartbeat and health say ``paused``.

Answers go to the request's MQTT 5 response topic with its correlation data, else to
``{prefix}/response/<name>``; a ``correlation_id`` field of the request is copied into the
answer (for MQTT 3.1.1 clients). Anyone who may publish on ``{prefix}/cmd/#`` commands the
agent: the broker's ACL decides who (docs/integration.md has the file to set).

Handlers run on the MQTT network thread and never block: triggers go to the source's queue,
the other commands to ``pending``, which the inspection loop works through between frames.
"""
from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from agent.mqtt import Publisher
from agent.sources.trigger import TriggerRequest

__all__ = ["COMMANDS", "Command", "Commands"]

log = logging.getLogger(__name__)

COMMANDS = ("reload", "pause", "resume")


@dataclass
class Command:
    """One command for the inspection loop; ``answer`` replies to whoever sent it."""
    name: str
    args: dict[str, Any]
    reply: Callable[[dict[str, Any]], None] = field(repr=False)

    def answer(self, ok: bool, error: str | None = None, **fields: Any) -> None:
        self.reply({"command": self.name, "ok": ok, "error": error, **fields})


class Commands:
    """Subscribes the publisher to the command topics; ``trigger`` takes a TriggerRequest and
    returns why it is refused (or None), as ``Service.trigger`` does."""

    def __init__(self, publisher: Publisher, prefix: str, trigger: Callable[[TriggerRequest], str | None] | None,
                 loop_commands: bool) -> None:
        self.publisher = publisher
        self.prefix = prefix
        self.trigger = trigger
        self.pending: queue.SimpleQueue[Command] = queue.SimpleQueue()
        if trigger is not None:
            publisher.subscribe(f"{prefix}/cmd/trigger", self._on_trigger)
        if loop_commands:
            for name in COMMANDS:
                publisher.subscribe(f"{prefix}/cmd/{name}", self._on_command)

    def _on_trigger(self, message: mqtt.MQTTMessage) -> None:
        reply = self._replier(message, "trigger")
        args = _arguments(message.payload)
        if isinstance(args, (str, int)) and not isinstance(args, bool):
            args = {"part_id": str(args)}
        why = _trigger_problem(args)
        if why is not None:
            reply({"command": "trigger", "ok": False, "error": why, "part_id": None})
            return
        part_id = str(args["part_id"])
        request = TriggerRequest(part_id, dict(args.get("meta") or {}), args.get("image_path"),
                                 reply=lambda verdict: reply({"command": "trigger", "ok": True, "error": None,
                                                              "part_id": part_id, "verdict": verdict}))
        why = self.trigger(request)
        if why is not None:
            log.warning("trigger for part %s refused: %s", part_id, why)
            reply({"command": "trigger", "ok": False, "error": why, "part_id": part_id})

    def _on_command(self, message: mqtt.MQTTMessage) -> None:
        name = message.topic.rsplit("/", 1)[1]
        reply = self._replier(message, name)
        args = _arguments(message.payload) if message.payload else {}
        if not isinstance(args, dict):
            reply({"command": name, "ok": False, "error": "expected a JSON object"})
            return
        log.info("command %s %s", name, json.dumps(args))
        self.pending.put(Command(name, args, reply))

    def _replier(self, message: mqtt.MQTTMessage, name: str) -> Callable[[dict[str, Any]], None]:
        """Where the answer to ``message`` goes: its response topic (MQTT 5) or ``{prefix}/response/<name>``."""
        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", None) or f"{self.prefix}/response/{name}"
        correlation = getattr(props, "CorrelationData", None)
        args = _arguments(message.payload)
        correlation_id = args.get("correlation_id") if isinstance(args, dict) else None

        def reply(body: dict[str, Any]) -> None:
            if correlation_id is not None:
                body = {**body, "correlation_id": correlation_id}
            self.publisher.respond(topic, body, correlation)

        return reply


def _arguments(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _trigger_problem(args: Any) -> str | None:
    if not isinstance(args, dict):
        return 'expected JSON {"part_id": ..., "meta": {...}, "image_path": ...} or a part id'
    part_id = args.get("part_id")
    if not isinstance(part_id, (str, int)) or isinstance(part_id, bool) or str(part_id) == "":
        return "part_id: expected a non-empty string or number"
    if not isinstance(args.get("meta", {}), dict):
        return "meta: expected an object"
    if not isinstance(args.get("image_path", ""), str):
        return "image_path: expected a string"
    unknown = set(args) - {"part_id", "meta", "image_path", "correlation_id"}
    if unknown:
        return f"unknown field(s): {', '.join(sorted(unknown))}"
    return None
