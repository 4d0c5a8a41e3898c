"""The live demo: a local Mosquitto, a calibrated model, the agent streaming frames, verdicts at a subscriber.

On a fresh machine it makes synthetic sample data (a textured part, some with drawn
defects), calibrates PaDiM on it, evaluates it (report under WORKDIR/report), starts a
Mosquitto broker on a free loopback port, runs the agent on a stream of synthetic frames
(or on ``--frames DIR``) and prints every verdict a separate MQTT subscriber receives.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import Config, ModelConfig
from agent.mqtt import MqttConfig, image_root
from agent.service import run
from calibration.calibrate import calibrate
from calibration.evaluate import evaluate, write_outputs
from calibration.synthetic import write_dataset
from engines.bundle import BundleError, load_bundle
from engines.runtimes import open_backend
from engines.pipeline import Pipeline

log = logging.getLogger("agent.demo")
PREFIX = "demo/line1"
IMAGES = image_root(MqttConfig(topic_prefix=PREFIX))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("demo"))
    p.add_argument("--count", type=int, default=40, help="synthetic frames to stream")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--frames", type=Path, default=None, help="stream this image folder instead")
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="synthetic frame size")
    p.add_argument("--model", type=Path, default=None, help="serve this bundle instead of the demo's own")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent.mqtt").setLevel(logging.WARNING)

    bundle = load_bundle(args.model) if args.model else _model(args.workdir)
    broker = _Broker()
    try:
        received = _Subscriber(broker.port)
        cfg = Config()
        cfg.agent.model = bundle.path
        cfg.source = ({"kind": "folder", "path": str(args.frames)} if args.frames else
                      {"kind": "synthetic", "count": args.count, "fps": args.fps, "size": args.size, "seed": 7})
        cfg.mqtt = MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX, client_id="demo-agent",
                              spool_path=args.workdir / "spool.sqlite", health_interval_s=2.0)
        run(cfg, threading.Event())
        received.wait_settled()
        print(json.dumps({"verdicts": len(received.verdicts), "images": received.images,
                          "ng": sum(v["status"] == "ng" for v in received.verdicts),
                          "errors": sum(v["status"] == "error" for v in received.verdicts),
                          "last_health": received.health}, indent=1))
    finally:
        broker.stop()
    return 0


def _model(workdir: Path):
    data, bundle_dir = workdir / "data", workdir / "bundle"
    if not (data / "train" / "good").is_dir():
        write_dataset(data, seed=0)
    try:
        return load_bundle(bundle_dir)
    except BundleError:
        calibrate(data, bundle_dir, ModelConfig())
    bundle = load_bundle(bundle_dir)
    backend, why = open_backend(bundle)
    ev = evaluate(bundle, Pipeline(bundle, backend), data)
    summary = write_outputs(ev, bundle, backend.name, workdir / "report")
    log.info("evaluation (%s): image AUROC %.3f, pixel AUROC %.3f, pixel AUPR %.3f; report %s", why,
             summary["image_auroc"], summary["pixel_auroc"], summary["pixel_aupr"], workdir / "report" / "index.html")
    return bundle


class _Broker:
    """A throw-away Mosquitto on a free loopback port."""

    def __init__(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise SystemExit("mosquitto is not installed: apt-get install mosquitto (scripts/setup.sh does it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="demo-broker-"))
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                log.info("mosquitto listening on 127.0.0.1:%d", self.port)
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


class _Subscriber:
    """What the PLC side sees: prints each verdict as it arrives."""

    def __init__(self, port: int) -> None:
        self.verdicts: list[dict] = []
        self.images = 0
        self.health: dict = {}
        self.last = time.monotonic()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-plc", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe([(f"{PREFIX}/#", 1), (f"{IMAGES}/#", 1)])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.last = time.monotonic()
        if msg.topic.endswith("/verdict"):
            v = json.loads(msg.payload)
            self.verdicts.append(v)
            score = "" if v["image_score"] is None else f"score {v['image_score']:8.3f} (norm {v['normalized_score']:5.2f})"
            print(f"[subscriber] {v['frame_id']:<40} {v['status']:<5} {score} regions {len(v['regions'])}"
                  + (f" error: {v['error']}" if v["error"] else ""), flush=True)
        elif msg.topic.startswith(f"{IMAGES}/"):
            self.images += 1
        elif msg.topic.endswith("/health"):
            self.health = json.loads(msg.payload)

    def wait_settled(self, quiet_s: float = 1.0) -> None:
        while time.monotonic() - self.last < quiet_s:
            time.sleep(0.1)
        self.client.disconnect()
        self.client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
