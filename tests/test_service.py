"""The agent end to end: a real Mosquitto, the `run` command in a subprocess, faults included."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from jsonschema import Draft202012Validator

from conftest import AGENTS
from mqtt_client import WAIT_S

REPO = Path(__file__).resolve().parents[1]
PREFIX = "plant/line7"
IMAGES = f"images/{PREFIX}"  # the image topics' tree by default
SCHEMA = json.loads((REPO / "agent" / "verdict.schema.json").read_text())


def write_config(tmp_path: Path, broker: Any, bundle_dir: Path, source: dict, mqtt: dict | None = None,
                 **agent: Any) -> Path:
    cfg = {
        "runtime": {"backend": "onnxruntime", "threads": 1},
        "source": source,
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX, "client_id": "agent-e2e",
                 "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "health_interval_s": 0.5,
                 "spool_path": str(tmp_path / "spool.sqlite"), **(mqtt or {})},
        "agent": {"model": str(bundle_dir), "stop_timeout_s": 3.0, **agent},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_agent(config: Path, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    AGENTS.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = WAIT_S) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def synthetic(count: int, fps: float = 0.0) -> dict:
    return {"kind": "synthetic", "count": count, "fps": fps, "size": [160, 192], "defect_rate": 0.5, "seed": 3}


def spooled(tmp_path: Path) -> int:
    """Verdicts waiting in the agent's spool; 0 until the agent has made the file and its table."""
    if not (tmp_path / "spool.sqlite").exists():
        return 0
    try:
        with sqlite3.connect(tmp_path / "spool.sqlite") as db:
            return db.execute("select count(*) from spool where kind = 'verdict'").fetchone()[0]
    except sqlite3.OperationalError:  # the file exists before its table does
        return 0


def test_n_frames_give_n_valid_verdicts_and_images_on_their_own_tree(mosquitto, subscribers, padim_bundle,
                                                                     tmp_path: Path) -> None:
    sub = subscribers(mosquitto, prefix=PREFIX)  # what a <prefix>/# JSON consumer sees
    hmi = subscribers(mosquitto, prefix=IMAGES)
    n = 12
    finish(start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(n), {"images": "all"},
                                    name="line7-cam1")))
    sub.wait_for(lambda: len(sub.verdict_ids()) == n, f"{n} verdicts")
    hmi.wait_for(lambda: len(frame_images(hmi)) == n, f"{n} images")
    verdicts = [json.loads(m.payload) for m in sub.on(f"{PREFIX}/verdict")]
    validator = Draft202012Validator(SCHEMA)
    for v in verdicts:
        validator.validate(v)
    ids = [v["frame_id"] for v in verdicts]
    assert len(set(ids)) == n
    assert {v["status"] for v in verdicts} <= {"ok", "ng"} and "ng" in {v["status"] for v in verdicts}
    for v in verdicts:
        assert (v["status"] == "ng") == (v["normalized_score"] >= 1.0) == bool(v["regions"])
        assert v["model"]["id"] == padim_bundle.manifest.model_id
        assert {"prepare", "score", "stitch", "download", "image"} <= set(v["timings_ms"])
    assert all(m.topic.startswith(f"{PREFIX}/") and m.topic.rsplit("/", 1)[1] in ("verdict", "status", "health",
                                                                                  "last_result", "heartbeat")
               for m in sub.messages)  # JSON only

    by_id = {v["frame_id"]: v for v in verdicts}
    images = frame_images(hmi)
    assert set(images) == set(ids)
    for frame_id, msg in images.items():
        status = by_id[frame_id]["status"]
        assert msg.topic == f"{IMAGES}/{status}/{frame_id}"
        img = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape[:2] == (160, 192), frame_id
        assert msg.properties.CorrelationData == frame_id.encode()
        assert msg.properties.UserProperty == [("frame_id", frame_id), ("status", status),
                                               ("score", f"{by_id[frame_id]['normalized_score']:.4f}")]
    last_ng = [v for v in verdicts if v["status"] == "ng"][-1]["frame_id"]
    hmi.wait_for(lambda: hmi.on(f"{IMAGES}/last_ng"), "the last NG image")
    assert hmi.on(f"{IMAGES}/last_ng")[-1].properties.CorrelationData == last_ng.encode()

    status = json.loads(sub.on(f"{PREFIX}/status")[-1].payload)
    assert status["state"] == "offline" and status["reason"] == "stopped"
    model = padim_bundle.manifest
    assert status["agent"] == "line7-cam1" and status["model_id"] == model.model_id
    assert status["model_version"] == by_id[ids[0]]["model"]["version"]
    later = subscribers(mosquitto, prefix=PREFIX)  # a dashboard starting now: the retained health
    later.wait_for(lambda: later.on(f"{PREFIX}/health"), "the retained health")
    (health,) = later.on(f"{PREFIX}/health")
    body = json.loads(health.payload)
    # stage_ms is the last window, which may be empty at the end; stage_ms_overall is the run
    assert health.retain and body["frames"] == n and "score" in body["stage_ms_overall"]
    assert body["agent"] == "line7-cam1" and body["model_version"] == status["model_version"]
    assert abs(body["timestamp"] - time.time()) < WAIT_S


def frame_images(sub) -> dict[str, Any]:
    """Per-frame images by frame id (the last NG's retained copy is not one of them)."""
    return {m.topic.rsplit("/", 1)[1]: m for m in sub.messages if m.topic.count("/") == IMAGES.count("/") + 2}


def test_corrupt_image_gives_an_error_verdict_and_the_stream_goes_on(mosquitto, subscribers, padim_bundle,
                                                                      sample_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    goods = sorted((sample_data / "test" / "good").glob("*.png"))[:3]
    for i, p in enumerate(goods):
        (folder / f"{i * 2:02d}.png").write_bytes(p.read_bytes())
    (folder / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    sub = subscribers(mosquitto, prefix=PREFIX)
    finish(start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, {"kind": "folder", "path": str(folder)})))
    sub.wait_for(lambda: len(sub.verdict_ids()) == 4, "4 verdicts")
    by_id = {json.loads(m.payload)["frame_id"]: json.loads(m.payload) for m in sub.on(f"{PREFIX}/verdict")}
    assert by_id["01"]["status"] == "error" and "01.png" in by_id["01"]["error"]
    assert all(by_id[k]["status"] in ("ok", "ng") for k in ("00", "02", "04"))
    Draft202012Validator(SCHEMA).validate(by_id["01"])


def test_broker_stopped_mid_stream_and_restarted_loses_nothing(mosquitto, subscribers, padim_bundle,
                                                                tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt

    sub = subscribers(mosquitto, prefix=PREFIX, protocol=mqtt.MQTTv311, client_id="plc", persistent=True)
    n = 30
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(n, fps=10)))
    sub.wait_for(lambda: len(sub.verdict_ids()) >= 5, "the first verdicts")
    mosquitto.stop()
    time.sleep(1.5)
    assert proc.poll() is None, "the agent must keep running through a broker outage"
    mosquitto.start()
    finish(proc)
    sub.wait_for(lambda: len(set(sub.verdict_ids())) == n, f"all {n} verdicts after the outage")


def test_killed_agent_delivers_its_spool_after_restart(mosquitto, subscribers, padim_bundle, tmp_path: Path) -> None:
    n = 8
    mosquitto.stop()
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=20)))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and spooled(tmp_path) < n:
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no clean stop, the spool is all that is left
    proc.wait()
    left = spooled(tmp_path)
    assert left >= n
    with sqlite3.connect(tmp_path / "spool.sqlite") as db:
        unsent = [json.loads(p)["frame_id"] for (p,) in db.execute(
            "select payload from spool where kind = 'verdict' order by seq")]

    mosquitto.start()
    sub = subscribers(mosquitto, prefix=PREFIX)
    finish(start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(1))))
    sub.wait_for(lambda: set(unsent) <= set(sub.verdict_ids()), "the spooled verdicts")
    assert sub.verdict_ids()[:len(unsent)] == unsent  # replayed in order, before the new frame
    assert len(sub.verdict_ids()) == len(unsent) + 1


def test_sigterm_exits_0_quickly_and_publishes_offline(mosquitto, subscribers, padim_bundle, tmp_path: Path) -> None:
    sub = subscribers(mosquitto, prefix=PREFIX)
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=20)))
    sub.wait_for(lambda: len(sub.verdict_ids()) >= 3, "verdicts from the running agent")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    finish(proc, timeout=10)
    assert time.monotonic() - t < 10
    sub.wait_for(lambda: sub.on(f"{PREFIX}/status")
                 and json.loads(sub.on(f"{PREFIX}/status")[-1].payload)["state"] == "offline", "offline status")
    ids = sub.verdict_ids()
    assert len(ids) == len(set(ids))


def test_notify_socket_receives_ready_and_watchdog(mosquitto, padim_bundle, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(WAIT_S)
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=5)),
                       env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    try:
        got: list[str] = []
        while not ("READY=1" in got and got.count("WATCHDOG=1") >= 2):
            got += sock.recv(4096).decode().splitlines()
        assert got.index("READY=1") < got.index("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        finish(proc, timeout=10)
        while "STOPPING=1" not in got:
            got += sock.recv(4096).decode().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_run_without_a_model_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source:\n  kind: synthetic\n")
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2 and "agent.model" in r.stderr


def test_health_counts_the_object_mask_fallbacks_and_the_log_warns_once(mosquitto, subscribers, padim_bundle,
                                                                        tmp_path: Path) -> None:
    import shutil

    from calibration.masks import fit_mask
    from calibration.synthetic import synthetic_part
    from engines.bundle import write_manifest
    from engines.masks import MaskConfig

    bundle = tmp_path / "masked"
    shutil.copytree(padim_bundle.path, bundle)
    refs = []
    for seed in (3, 5):
        refs.append(tmp_path / "refs" / f"{seed}.png")
        refs[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(refs[-1]), synthetic_part(np.random.default_rng(seed), (160, 192))[0])
    manifest = padim_bundle.manifest.model_copy(deep=True)
    manifest.model.mask = MaskConfig(kind="features", references=2)
    fitted = fit_mask(manifest.model.mask, refs, bundle)
    manifest.mask_files, manifest.mask_learnt = fitted.references, fitted.learnt
    write_manifest(bundle, manifest)

    sub = subscribers(mosquitto, prefix=PREFIX)
    n = 6
    err = finish(start_agent(write_config(tmp_path, mosquitto, bundle, synthetic(n))))
    sub.wait_for(lambda: len(sub.verdict_ids()) == n, f"{n} verdicts")
    health = json.loads(sub.on(f"{PREFIX}/health")[-1].payload)
    # Synthetic parts are brushed at random: most do not lock on to the references and fall back to
    # the learnt shape; every frame is counted once, the warm-up frame not at all.
    assert health["frames"] == n and sum(health["mask"].values()) == n
    assert set(health["mask"]) <= {"homography", "learnt"} and health["mask"]["learnt"] >= n // 2
    assert err.count("object mask did not lock on") == 1
