"""Run the agent: frames in, verdicts and heatmaps out over MQTT, as a systemd service.

Two steps. ``build`` does everything before READY: check the configuration against the machine
(``preflight``), load and verify the bundle, start the backend and warm it with one frame of
the size it will serve, open the spool, make the MQTT client and open the source. A
configuration, bundle or source mistake found there is a ``ConfigError`` (exit 2, one line);
anything else that fails there is a plain failure (exit 1, restarted by systemd).

``Service.serve`` starts the publisher and the source, tells systemd READY=1 and runs the
inference loop, which sends WATCHDOG=1 (a hung engine stops the pings). How it ends decides the
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
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import exit_codes, notify
from agent.config import Config, ConfigError, preflight
from agent.frames import Frame
from agent.health import Health
from agent.inspector import Inspector
from agent.mqtt import Publisher
from agent.sources import FrameSource, SourceError, open_source
from agent.spool import Spool
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
    inspector = Inspector(bundle, pipeline, cfg.agent.heatmap, cfg.agent.heatmap_max_side, cfg.mqtt.heatmap_format)
    try:
        spool = Spool(cfg.mqtt.spool_path, cfg.mqtt.spool_max_messages, cfg.mqtt.spool_max_bytes)
    except OSError as e:
        raise ConfigError(f"{where}: mqtt.spool_path: {e}") from None
    try:
        publisher = Publisher(cfg.mqtt, spool)
        source = open_source(cfg.source)
    except SourceError as e:
        spool.close()
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        spool.close()
        raise ConfigError(f"{where}: mqtt.{e}") from None
    return Service(cfg, bundle, backend.name, inspector, spool, publisher, source)


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

    def __post_init__(self) -> None:
        self.health = Health()
        self.unjudged = 0   # frames captured but not inspected before the stop deadline

    def serve(self, stop: threading.Event, max_frames: int = 0) -> int:
        """READY, the inference loop, then a clean stop; returns the exit status."""
        self.publisher.start()
        self.source.start()
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
        last_ping = last_health = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now - last_ping >= watchdog_every:
                notify.watchdog()  # from this loop only: a stuck engine stops the pings
                last_ping = now
            if now - last_health >= self.cfg.mqtt.health_interval_s:
                self.publisher.publish_health(self.health_report())
                last_health = now
            frame = self.source.get(timeout=0.2)
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
        result = self.inspector.inspect(frame)
        self.publisher.publish_verdict(result.verdict, result.heatmap)
        self.health.record(result.verdict, (time.perf_counter() - t) * 1000.0)

    def _stop(self, drain: bool) -> None:
        """Stop capture, judge what was captured (drain) within the stop timeout, flush, close."""
        notify.stopping()
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
        final = self.health_report()
        self.publisher.publish_health(final)
        log.info("health: %s", json.dumps(final, separators=(",", ":")))
        flushed = self.publisher.stop(max(0.5, deadline - time.monotonic()))
        self.spool.close()
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
            self.publisher.publish_verdict(verdict, None)
            self.health.record(verdict, 0.0)
        self.unjudged += len(late)
        if late:
            log.warning("stopping: %d captured frame(s) not inspected in time (error verdicts sent): %s%s",
                        len(late), ", ".join(late[:10]), ", ..." if len(late) > 10 else "")

    def health_report(self) -> dict[str, Any]:
        mask = self.inspector.pipeline.mask
        # Frames by how the object mask found the part (homography, learnt, all, roi): fallbacks show here.
        extra = {"mask": dict(mask.counts)} if mask is not None else {}
        return self.health.report(agent=self.cfg.agent.name, model_id=self.bundle.manifest.model_id,
                                  backend=self.backend_name, unjudged=self.unjudged,
                                  source=asdict(self.source.stats), mqtt=asdict(self.publisher.stats), **extra)

