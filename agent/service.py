"""Run the agent: frames in, verdicts and heatmaps out over MQTT, as a systemd service.

Start-up: load and verify the bundle, start the backend and warm it, open the spool and the
broker connection, open the source; then READY=1. The inference loop sends WATCHDOG=1, so a
hung engine stops the pings and systemd restarts the service. SIGTERM/SIGINT: stop taking
frames, finish the frame in flight (its verdict is spooled), flush what the broker will
take within agent.stop_timeout_s, publish offline, exit 0.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
import logging
import signal
import threading
import time
from typing import Any

import numpy as np

from agent import notify
from agent.config import Config, ConfigError
from agent.health import Health
from agent.inspector import Inspector
from agent.mqtt import Publisher
from agent.sources import open_source
from agent.spool import Spool
from engines.bundle import load_bundle
from engines.runtimes import open_backend
from engines.scorer import Scorer

log = logging.getLogger("agent.service")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = no limit)")


def command(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.agent.model is None:
        raise ConfigError(f"{args.config or 'built-in defaults'}: agent.model: a bundle directory is required to run")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: (log.info("signal %d: stopping", signum), stop.set()))
    return run(cfg, stop, max_frames=args.max_frames)


def run(cfg: Config, stop: threading.Event, max_frames: int = 0) -> int:
    bundle = load_bundle(cfg.agent.model)
    rt = cfg.runtime
    backend, why = open_backend(bundle, rt.backend, rt.device, rt.threads, rt.fallback)
    log.info("model %s (%s) from %s; %s", bundle.manifest.model_id, bundle.manifest.method, bundle.path, why)
    scorer = Scorer(bundle, backend, rt.batch_size)
    _warm_up(scorer, cfg)
    inspector = Inspector(bundle, scorer, cfg.agent.heatmap, cfg.agent.heatmap_max_side, cfg.mqtt.heatmap_format)

    cfg.mqtt.spool_path.parent.mkdir(parents=True, exist_ok=True)
    spool = Spool(cfg.mqtt.spool_path, cfg.mqtt.spool_max_messages, cfg.mqtt.spool_max_bytes)
    publisher = Publisher(cfg.mqtt, spool)
    publisher.start()
    source = open_source(cfg.source)
    source.start()
    health = Health()
    notify.ready(f"serving {bundle.manifest.model_id} with {backend.name}")
    log.info("ready: source %s, backend %s", cfg.source.kind, backend.name)

    watchdog_every = notify.watchdog_interval_s() or 5.0
    last_ping = last_health = time.monotonic()
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now - last_ping >= watchdog_every:
                notify.watchdog()  # from this loop only: a stuck engine stops the pings
                last_ping = now
            if now - last_health >= cfg.mqtt.health_interval_s:
                publisher.publish_health(_health(health, bundle.manifest.model_id, backend.name, source, publisher))
                last_health = now
            frame = source.get(timeout=0.2)
            if frame is None:
                if source.finished:
                    log.info("source finished after %d frames", health.frames)
                    break
                continue
            t = time.perf_counter()
            result = inspector.inspect(frame)
            publisher.publish_verdict(result.verdict, result.heatmap)
            health.record(result.verdict, (time.perf_counter() - t) * 1000.0)
            if max_frames and health.frames >= max_frames:
                break
    finally:
        notify.stopping()
        source.stop(timeout=1.0)
        final = _health(health, bundle.manifest.model_id, backend.name, source, publisher)
        publisher.publish_health(final)
        log.info("health: %s", final)
        flushed = publisher.stop(cfg.agent.stop_timeout_s)
        spool.close()
        log.info("stopped after %d frames (%d ok, %d ng, %d error); spool %s",
                 health.frames, health.ok, health.ng, health.errors, "empty" if flushed else "kept for next start")
    return 0


def _warm_up(scorer: Scorer, cfg: Config) -> None:
    """One frame through the whole path, so READY means the first real frame is not slow."""
    h, w = cfg.source.size if cfg.source.kind == "synthetic" else scorer.input_hw
    scorer.score_frame(np.zeros((h, w, 3), np.uint8))


def _health(health: Health, model_id: str, backend: str, source: Any, publisher: Publisher) -> dict[str, Any]:
    return health.report(model_id=model_id, backend=backend, source=asdict(source.stats),
                         mqtt=asdict(publisher.stats))
