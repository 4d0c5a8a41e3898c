"""Run the agent: frames in, verdicts and images out over MQTT (and to the archive and the live
page), as a systemd service.

Two steps. ``build`` does everything before READY: check the configuration against the machine
(``preflight``), load and verify the bundle, start the backend and warm it with one frame of
the size it will serve, open the spool, make the MQTT client, open the source, and bind the
HTTP server when ``agent.http.listen`` is set. A configuration, bundle or source mistake found
there (an HTTP address in use too) is a ``ConfigError`` (exit 2, one line); anything else that
fails there is a plain failure (exit 1, restarted by systemd).

``Service.serve`` starts the sinks (MQTT, the archive), the source and the HTTP server, tells
systemd READY=1 and runs the inference loop, which sends WATCHDOG=1 (a hung engine stops the
pings). Every inspection goes to each sink's ``publish``, none of which waits: the publisher
spools, the archive and the page's recent frames only take a reference. How it ends decides the
exit status (agent/exit_codes.py): SIGTERM/SIGINT, ``--max-frames`` and a batch source read to
its end are 0; a batch source that could not be read to its end, or a failure of the loop
itself, is 1. A frame's own trouble (unreadable, oversized, engine failure) is an error
verdict, never an exit.

Stopping (SIGTERM/SIGINT): capture stops; frames already captured are inspected until
``agent.stop_timeout_s`` leaves only the time needed to flush; any frame still waiting then
gets an ``error`` verdict saying it was not inspected (counted as ``unjudged`` in health), so
every frame that entered has exactly one verdict; the broker gets what it takes before the
deadline and the rest stays in the spool for the next start. SIGHUP is logged and ignored:
the configuration is read at start, so a change takes a restart.

Commands (agent/commands.py): a trigger goes to the trigger source (refused while paused);
reload, pause and resume are carried out by the inspection loop between frames, so a reload
never swaps the model under a frame being scored. A reload verifies the new bundle (load,
hashes, backend, one warm-up frame) before switching; on failure the old one keeps serving.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import exit_codes, notify
from agent.archive import Archive
from agent.commands import Command, Commands
from agent.config import Config, ConfigError, preflight
from agent.frames import Frame
from agent.health import Health
from agent.http import HttpServer
from agent.inspector import Inspector
from agent.mqtt import Publisher
from agent.opcua import OpcuaServer
from agent.page import RecentFrames
from agent.sources import FrameSource, SourceError, open_source
from agent.sources.trigger import TriggerRequest, TriggerSource
from agent.sparkplug import SparkplugNode, spool_path
from agent.spool import Spool
from agent.verdict import Inspection
from engines.bundle import Bundle, BundleError, load_bundle
from engines.pipeline import Pipeline
from engines.runtimes import open_backend

__all__ = ["Service", "build", "run"]

log = logging.getLogger("agent.service")

# Of agent.stop_timeout_s, at least this share is kept for handing the spool to the broker.
_FLUSH_SHARE = 0.3


def command(args: argparse.Namespace, cfg: Config) -> int:
    stop = threading.Event()

    def on_stop(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGHUP, lambda *_: log.warning(
        "SIGHUP ignored: the configuration is read at start; restart the service to apply a change"))
    service = build(cfg, args.config)
    code = service.serve(stop, max_frames=args.max_frames)
    # Everything is flushed and closed by now; the interpreter's teardown of the torch and ONNX
    # Runtime thread pools would add most of a second before systemd sees the exit.
    logging.shutdown()
    os._exit(code)


def run(cfg: Config, stop: threading.Event, max_frames: int = 0, config_file: Path | None = None) -> int:
    """Build and serve in one call (the demo and tests); returns the exit status."""
    return build(cfg, config_file).serve(stop, max_frames=max_frames)


def build(cfg: Config, config_file: Path | None = None) -> "Service":
    """Everything before READY; configuration, bundle and source mistakes raise ConfigError."""
    where = str(config_file) if config_file is not None else "built-in defaults"
    preflight(cfg, config_file, serving=True)
    try:
        bundle = load_bundle(cfg.agent.model)
    except BundleError as e:
        raise ConfigError(f"{where}: agent.model: {e}") from None
    backend, why = open_backend(bundle, cfg.runtime)
    log.info("model %s (%s) from %s; %s", bundle.manifest.model_id, bundle.manifest.method, bundle.path, why)
    pipeline = Pipeline(bundle, backend, cfg.runtime)
    _warm_up(pipeline, bundle, cfg, where)
    inspector = Inspector(bundle, pipeline)
    identity = {"agent": cfg.agent.name, "model_id": inspector.model.id, "model_version": inspector.model.version}
    try:
        spool = Spool(cfg.mqtt.spool_path, cfg.mqtt.spool_max_messages, cfg.mqtt.spool_max_bytes)
    except OSError as e:
        raise ConfigError(f"{where}: mqtt.spool_path: {e}") from None
    try:
        publisher = Publisher(cfg.mqtt, spool, identity, cfg.agent.image_max_side)
        source = open_source(cfg.source)
    except SourceError as e:
        spool.close()
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        spool.close()
        raise ConfigError(f"{where}: mqtt.{e}") from None
    archive = Archive(cfg.agent.archive, cfg.agent.image_max_side) if cfg.agent.archive.dir is not None else None
    sparkplug = None
    if cfg.mqtt.sparkplug.enabled:
        spb = cfg.mqtt.sparkplug
        try:
            spb_spool = Spool(spool_path(cfg.mqtt), spb.spool_max_messages, cfg.mqtt.spool_max_bytes)
        except OSError as e:
            spool.close()
            raise ConfigError(f"{where}: mqtt.sparkplug.spool_path: {e}") from None
        sparkplug = SparkplugNode(cfg.mqtt, spb_spool, spb.edge_node_id or cfg.agent.name,
                                  spb.device_id or source.name, cfg.agent.name)
    service = Service(cfg, bundle, backend.name, inspector, spool, publisher, source, archive, sparkplug)
    if isinstance(source, TriggerSource) or cfg.mqtt.commands:
        service.commands = Commands(publisher, cfg.mqtt.topic_prefix,
                                    service.trigger if isinstance(source, TriggerSource) else None,
                                    cfg.mqtt.commands)
    if cfg.agent.http.listen is not None:
        try:
            service.open_http()
        except OSError as e:
            spool.close()
            raise ConfigError(f"{where}: agent.http.listen: cannot listen on {cfg.agent.http.listen}: "
                              f"{e.strerror or e}") from None
    if cfg.opcua.enabled:
        try:
            service.open_opcua()
        except OSError as e:
            spool.close()
            raise ConfigError(f"{where}: opcua.endpoint: cannot serve on {cfg.opcua.endpoint}: "
                              f"{e.strerror or e}") from None
    return service


def _warm_up(pipeline: Pipeline, bundle: Bundle, cfg: Config, where: str) -> None:
    """One frame through the whole path, so READY means the first real frame is not slow. The
    frame has the size the bundle serves: a per-tile-position bundle takes only its own."""
    frame_hw = bundle.manifest.frame_size
    if cfg.source.kind == "synthetic" and not bundle.manifest.model.per_position:
        frame_hw = cfg.source.size
    try:
        pipeline.score_frame(np.zeros((int(frame_hw[0]), int(frame_hw[1]), 3), np.uint8))
    except ValueError as e:  # the bundle cannot score such frames (calibrated for another size)
        raise ConfigError(f"{where}: agent.model: {e}") from None
    if pipeline.mask is not None:
        pipeline.mask.counts.clear()  # a blank frame never locks on: health counts real frames


@dataclass
class Service:
    cfg: Config
    bundle: Bundle
    backend_name: str
    inspector: Inspector
    spool: Spool
    publisher: Publisher
    source: FrameSource
    archive: Archive | None = None
    sparkplug: SparkplugNode | None = None
    commands: Commands | None = None

    def __post_init__(self) -> None:
        self.health = Health()
        self.unjudged = 0   # frames captured but not inspected before the stop deadline
        self.sinks: list[Publisher | Archive | RecentFrames | SparkplugNode | OpcuaServer] = [self.publisher]
        if self.archive is not None:
            self.sinks.append(self.archive)
        if self.sparkplug is not None:
            self.sinks.append(self.sparkplug)
        self.http: HttpServer | None = None
        self.opcua: OpcuaServer | None = None
        self._state = "starting"
        self._paused = threading.Event()
        self._loop_turned = time.monotonic()  # for /healthz: the inspection loop is alive

    def open_http(self) -> None:
        """Bind the live page's server (``agent.http.listen``); OSError when the address cannot be had."""
        recent = RecentFrames(self.cfg.agent.http.recent, self.cfg.agent.image_max_side)
        self.http = HttpServer(self.cfg.agent.http, self.health, recent, self.status)
        self.sinks.append(recent)

    def open_opcua(self) -> None:
        """Start the OPC UA server (its certificate made if needed); OSError when it cannot serve."""
        server = OpcuaServer(self.cfg.opcua, self.cfg.agent.name, self.status, self.trigger)
        server.start()
        self.opcua = server
        self.sinks.append(server)

    def serve(self, stop: threading.Event, max_frames: int = 0) -> int:
        """READY, the inference loop, then a clean stop; returns the exit status."""
        self.publisher.start()
        if self.archive is not None:
            self.archive.start()
        if self.sparkplug is not None:
            self.sparkplug.start()
        self.source.start()
        self._state = "serving"
        if self.http is not None:
            self.http.start()
        model_id = self.bundle.manifest.model_id
        notify.ready(f"serving {model_id} with {self.backend_name}")
        log.info("ready: source %s, backend %s", self.cfg.source.kind, self.backend_name)
        try:
            ended = self._loop(stop, max_frames)
        except Exception:
            log.exception("inspection loop failed; stopping")
            ended = "failure"
        self._stop(drain=ended == "signal")
        if ended == "source" and self.source.failure is not None:
            log.error("source %s did not reach its end: %s", self.source.name, self.source.failure)
            return exit_codes.FAILURE
        return exit_codes.FAILURE if ended == "failure" else exit_codes.OK

    def _loop(self, stop: threading.Event, max_frames: int) -> str:
        """Frames until a deliberate end; returns why it ended: signal, max_frames or source."""
        watchdog_every = notify.watchdog_interval_s() or 5.0
        last_ping = last_health = last_beat = time.monotonic()
        while not stop.is_set():
            now = self._loop_turned = time.monotonic()
            if now - last_ping >= watchdog_every:
                notify.watchdog()  # from this loop only: a stuck engine stops the pings
                last_ping = now
            if now - last_health >= self.cfg.mqtt.health_interval_s:
                self.publisher.publish_health(self.health_report())
                last_health = now
            if self.cfg.mqtt.heartbeat_s and now - last_beat >= self.cfg.mqtt.heartbeat_s:
                self.publisher.publish_heartbeat(self.state)
                last_beat = now
            self._carry_out_commands()
            if self._paused.is_set():
                stop.wait(min(0.2, self.cfg.mqtt.heartbeat_s or 0.2))
                continue
            frame = self.source.get(timeout=min(0.2, self.cfg.mqtt.heartbeat_s or 0.2))
            if frame is None:
                if self.source.finished:
                    log.info("source finished after %d frames", self.health.frames)
                    return "source"
                continue
            self._inspect(frame)
            if max_frames and self.health.frames >= max_frames:
                return "max_frames"
        return "signal"

    def _inspect(self, frame: Frame) -> None:
        t = time.perf_counter()
        inspection = self.inspector.inspect(frame)
        self._publish(inspection, t)
        _answer_trigger(frame, inspection)

    @property
    def state(self) -> str:
        return "paused" if self._state == "serving" and self._paused.is_set() else self._state

    def trigger(self, request: TriggerRequest) -> str | None:
        """Queue a PLC trigger (any thread: MQTT, OPC UA); returns why it is refused, or None."""
        if not isinstance(self.source, TriggerSource):
            return f"the source is {self.cfg.source.kind}, not trigger"
        if self._paused.is_set():
            return "paused"
        return self.source.request(request)

    def _carry_out_commands(self) -> None:
        while self.commands is not None:
            try:
                command = self.commands.pending.get_nowait()
            except queue.Empty:
                return
            if command.name == "pause":
                self._paused.set()
                log.info("paused by command")
                command.answer(True, state=self.state)
            elif command.name == "resume":
                self._paused.clear()
                log.info("resumed by command")
                command.answer(True, state=self.state)
            elif command.name == "reload":
                self._reload(command)

    def _reload(self, command: Command) -> None:
        """Switch to a verified bundle, or keep the one serving and say why."""
        path = command.args.get("bundle", self.cfg.agent.model)
        if not isinstance(path, str) and not isinstance(path, Path):
            command.answer(False, "bundle: expected a path", model_id=self.inspector.model.id)
            return
        try:
            bundle = load_bundle(Path(path))
            backend, why = open_backend(bundle, self.cfg.runtime)
            pipeline = Pipeline(bundle, backend, self.cfg.runtime)
            _warm_up(pipeline, bundle, self.cfg, f"reload of {path}")
            inspector = Inspector(bundle, pipeline)
        except Exception as e:  # whatever is wrong with the new bundle, the old one serves on
            log.error("reload of %s refused: %s; still serving %s", path, e, self.inspector.model.id)
            command.answer(False, f"{type(e).__name__}: {e}", model_id=self.inspector.model.id,
                           model_version=self.inspector.model.version)
            return
        old = self.inspector.model
        self.bundle, self.inspector, self.backend_name = bundle, inspector, backend.name
        self.publisher.identity.update(model_id=inspector.model.id, model_version=inspector.model.version)
        log.info("reloaded: %s %s -> %s %s from %s (%s)", old.id, old.version, inspector.model.id,
                 inspector.model.version, bundle.path, why)
        command.answer(True, model_id=inspector.model.id, model_version=inspector.model.version,
                       previous={"model_id": old.id, "model_version": old.version})

    def _publish(self, inspection: Inspection, started: float) -> None:
        for sink in self.sinks:
            sink.publish(inspection)
        self.health.record(inspection.verdict, (time.perf_counter() - started) * 1000.0)

    def _stop(self, drain: bool) -> None:
        """Stop capture, judge what was captured (drain) within the stop timeout, write the archive's
        queue and flush MQTT within what is left of it, close."""
        notify.stopping()
        self._state = "stopping"
        deadline = time.monotonic() + self.cfg.agent.stop_timeout_s
        # A producer waiting on a full queue notices the stop within 0.1 s; one blocked in a camera
        # read is not waited for longer: a frame it still delivers is picked up after the drain.
        self.source.stop(timeout=1.0)
        queued = self.source.take_queued()
        if drain:
            judge_until = deadline - _FLUSH_SHARE * self.cfg.agent.stop_timeout_s
            while queued:
                self._drain(queued, judge_until)
                queued = self.source.take_queued()
        elif queued:
            log.info("%d frame(s) read ahead by the source were not taken", len(queued))
        if self.archive is not None:
            # Half of what is left: the verdicts waiting for the broker matter more than the evidence.
            self.archive.stop(max(0.2, (deadline - time.monotonic()) / 2))
        final = self.health_report()
        self.publisher.publish_health(final)
        log.info("health: %s", json.dumps(final, separators=(",", ":")))
        if self.sparkplug is not None:
            # The JSON verdicts are the contract; the Sparkplug flush gets a third of what is left.
            self.sparkplug.stop(max(0.3, (deadline - time.monotonic()) / 3))
        flushed = self.publisher.stop(max(0.5, deadline - time.monotonic()))
        self.spool.close()
        if self.http is not None:
            self.http.stop()
        if self.opcua is not None:
            self.opcua.stop()
        log.info("stopped after %d frames (%d ok, %d ng, %d error, %d not inspected); spool %s",
                 self.health.frames, self.health.ok, self.health.ng, self.health.errors, self.unjudged,
                 "empty" if flushed else "kept for next start")

    def _drain(self, queued: list[Frame], judge_until: float) -> None:
        """Captured frames are parts that passed the camera: inspect them while time allows, and
        give the rest an error verdict rather than silence."""
        log.info("stopping: %d captured frame(s) still to judge", len(queued))
        late = []
        for frame in queued:
            notify.watchdog()
            if time.monotonic() < judge_until:
                self._inspect(frame)
                continue
            late.append(frame.id)
            verdict = self.inspector.error_verdict(
                frame, "not inspected: the agent was stopped before this frame could be scored")
            self._publish(Inspection(verdict), time.perf_counter())
            _answer_trigger(frame, Inspection(verdict))
        self.unjudged += len(late)
        if late:
            log.warning("stopping: %d captured frame(s) not inspected in time (error verdicts sent): %s%s",
                        len(late), ", ".join(late[:10]), ", ..." if len(late) > 10 else "")

    def health_report(self) -> dict[str, Any]:
        """The health payload (closes a measurement window: the inspection loop's call)."""
        mask = self.inspector.pipeline.mask
        # Frames by how the object mask found the part (homography, learnt, all, roi): fallbacks show here.
        extra = {"mask": dict(mask.counts)} if mask is not None else {}
        return self.health.report(**self.status(), **extra)

    def status(self) -> dict[str, Any]:
        """Who serves what, and the state of the loop, the source and the sinks; any thread."""
        model = self.inspector.model
        return {"agent": self.cfg.agent.name, "model_id": model.id, "model_version": model.version,
                "backend": self.backend_name, "state": self.state,
                "loop_age_s": time.monotonic() - self._loop_turned, "unjudged": self.unjudged,
                "source": asdict(self.source.stats), "mqtt": asdict(self.publisher.stats),
                "archive": None if self.archive is None else asdict(self.archive.stats),
                "sparkplug": None if self.sparkplug is None else asdict(self.sparkplug.stats)}



def _answer_trigger(frame: Frame, inspection: Inspection) -> None:
    reply = frame.meta.get("reply")
    if reply is not None:
        reply(inspection.verdict.to_dict())
