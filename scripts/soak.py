"""Soak: the real agent against a real local Mosquitto for a while, with a broker restart half-way.

    python scripts/soak.py --model BUNDLE [--minutes 10] [--fps 20] [--size 256 256]

Prints one JSON record: frames the agent took (its final health), distinct verdicts a separate
subscriber received, duplicates (at-least-once re-deliveries), the agent's RSS after warm-up
and at the end, and its exit status. Frames in must equal distinct verdicts out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
PREFIX = "soak/line1"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=20.0)
    p.add_argument("--size", type=int, nargs=2, default=[256, 256])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    broker = Broker(work)
    received = Counter(broker.port)
    config = work / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "runtime": {"backend": "onnxruntime"},
        "source": {"kind": "synthetic", "count": 0, "fps": args.fps, "size": args.size, "seed": 1},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": PREFIX, "client_id": "soak-agent",
                 "spool_path": str(work / "spool.sqlite"), "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
        "agent": {"model": str(args.model.resolve())},
    }))
    log = open(work / "agent.log", "w")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO,
                             stderr=log, stdout=subprocess.DEVNULL)
    start = time.monotonic()
    time.sleep(30)
    rss_first = rss_mb(agent.pid)
    time.sleep(max(0.0, args.minutes * 30 - 30))
    broker.stop()  # an outage half-way
    time.sleep(10)
    broker.start()
    time.sleep(max(0.0, start + args.minutes * 60 - time.monotonic()))
    rss_last = rss_mb(agent.pid)
    agent.send_signal(signal.SIGTERM)
    code = agent.wait(timeout=60)
    log.close()
    received.wait_quiet()
    text = (work / "agent.log").read_text()
    health = json.loads([line for line in text.splitlines() if " agent.service: health: " in line][-1]
                        .split("health: ", 1)[1])
    record = {"minutes": args.minutes, "fps": args.fps, "size": args.size, "exit": code,
              "frames_in": health["frames"], "verdicts_out_distinct": len(received.ids),
              "verdict_messages": received.messages, "equal": health["frames"] == len(received.ids),
              "rss_mb_after_warmup": rss_first, "rss_mb_at_end": rss_last,
              "fps_overall": round(health["fps_overall"], 2), "mqtt": health["mqtt"],
              "errors": health["errors"], "log": str(work / "agent.log")}
    print(json.dumps(record, indent=1))
    broker.stop()
    return 0 if record["equal"] and code == 0 else 1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Broker:
    def __init__(self, work: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {work}/\n")
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class Counter:
    """A PLC-side subscriber with a persistent session (QoS 1): it gets what was sent while away."""

    def __init__(self, port: int) -> None:
        self.ids: set[str] = set()
        self.messages = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-plc", protocol=mqtt.MQTTv311,
                                  clean_session=False)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/verdict", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.ids.add(json.loads(msg.payload)["frame_id"])
            self.messages += 1
            self.last = time.monotonic()

    def wait_quiet(self, quiet_s: float = 5.0) -> None:
        while time.monotonic() - self.last < quiet_s:
            time.sleep(0.2)
        self.client.disconnect()
        self.client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
