"""The live page, /metrics and /healthz over real HTTP: the server on its own, then the agent end to end
with a real Mosquitto, the page loaded in headless Chromium and its counts held to what a subscriber got."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.health import Health
from agent.http import HttpServer, HttpSettings
from agent.page import RecentFrames
from agent.verdict import Inspection, ModelInfo, Region, Verdict
from conftest import free_port
from mqtt_client import WAIT_S, wait_until
from test_service import PREFIX, start_agent, write_config

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
MODEL = ModelInfo("bracket", "2025-01-01T00:00:00Z", "padim")


def get(url: str) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET; error statuses too."""
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def metrics(url: str) -> dict[str, Any]:
    """The scrape, parsed by prometheus_client's own parser: family name -> family."""
    status, content_type, body = get(url + "metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    family = next(f for f in families.values() if any(s.name == name for s in f.samples))
    (value,) = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v
                                                                          for k, v in labels.items())]
    return value


# -- the server on its own -------------------------------------------------------------------------


def inspection(i: int, status: str) -> Inspection:
    frame = np.full((60, 80, 3), 100 + i, np.uint8)
    score_map = np.full((60, 80), 1.0, np.float32)
    verdict = Verdict(frame_id=f"cam/{i}", seq=i, source="cam", timestamp=time.time(), status=status, model=MODEL,
                      image_score=9.0, threshold=5.0, normalized_score=1.8, pixel_threshold=4.0,
                      regions=[Region(1, 2, 3, 4, 12, 9.0)] if status == "ng" else [],
                      timings_ms={"network": 12.0, "head": 3.0})
    return Inspection(verdict, frame, score_map)


class Status:
    """What the service would report; ``loop_age_s`` and ``state`` set by the test."""

    def __init__(self) -> None:
        self.loop_age_s, self.state = 0.1, "serving"

    def __call__(self) -> dict[str, Any]:
        return {"agent": "line7", "model_id": MODEL.id, "model_version": MODEL.version, "backend": "onnxruntime",
                "state": self.state, "loop_age_s": self.loop_age_s, "unjudged": 0,
                "source": {"frames": 3, "dropped": 0, "errors": 0, "failures": 0, "connected": True},
                "mqtt": {"connected": True, "sent": 6, "acked": 6, "spooled": 2, "dropped": 0, "rejected": 0,
                         "direct": 0, "held": 0, "lost": 0, "spool_errors": 0, "spool_quarantined": 0,
                         "state": "connected"},
                "archive": None}


@pytest.fixture
def server() -> Any:
    health, recent, status = Health(), RecentFrames(size=2, image_max_side=40), Status()
    http = HttpServer(HttpSettings(listen=str(free_port())), health, recent, status)
    http.start()
    for i, s in enumerate(["ng", "ok", "ok"]):
        recent.publish(inspection(i, s))
        health.record(inspection(i, s).verdict, 20.0)
    yield http, status
    http.stop()


def test_state_images_metrics_and_healthz(server: Any) -> None:
    http, status = server
    assert http.url.startswith("http://127.0.0.1:")  # a bare port: loopback only
    code, content_type, page = get(http.url)
    assert code == 200 and content_type.startswith("text/html") and b'id="count-ng"' in page

    code, _, body = get(http.url + "api/state")
    state = json.loads(body)
    assert (state["frames"], state["ok"], state["ng"], state["errors"]) == (3, 2, 1, 0)
    assert [f["frame_id"] for f in state["recent"]] == ["cam/2", "cam/1"]  # the last two, newest first
    assert state["last_ng"]["frame_id"] == "cam/0"  # kept while no longer recent
    assert state["mqtt"]["spooled"] == 2 and state["agent"] == "line7"

    code, content_type, jpeg = get(http.url.rstrip("/") + state["last_ng"]["overlay"])
    assert code == 200 and content_type == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (30, 40, 3)
    assert get(http.url + "images/overlay/no-such-frame")[0] == 404
    assert get(http.url + "nothing-here")[0] == 404

    families = metrics(http.url)
    assert sample(families, "inspection_frames_total", status="ok") == 2
    assert sample(families, "inspection_frames_total", status="ng") == 1
    assert sample(families, "inspection_stage_seconds_count", stage="network") == 3
    assert sample(families, "inspection_stage_seconds_bucket", stage="network", le="0.025") == 3
    assert sample(families, "inspection_stage_seconds_bucket", stage="network", le="0.01") == 0
    assert sample(families, "inspection_spool_messages") == 2
    assert sample(families, "inspection_mqtt_state", state="connected") == 1
    assert sample(families, "inspection_agent_info", agent="line7", model_id="bracket") == 1

    assert get(http.url + "healthz")[0] == 200
    status.loop_age_s = 120.0
    code, _, body = get(http.url + "healthz")
    assert code == 503 and json.loads(body)["status"] == "stalled"
    status.loop_age_s, status.state = 0.1, "stopping"
    assert json.loads(get(http.url + "healthz")[2])["status"] == "stopping"


# -- the agent end to end --------------------------------------------------------------------------


def page_dom(url: str, profile: Path) -> str:
    """The page's DOM after its script ran, from headless Chromium."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def shown(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element {element_id} in the page"
    return match.group(1)


@pytest.mark.slow
def test_the_page_in_a_browser_shows_what_the_plant_received(mosquitto, subscribers, padim_bundle,
                                                             sample_data: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install -y chromium; scripts/setup.sh does it)")
    frames = tmp_path / "frames"
    frames.mkdir()
    tests = sorted((sample_data / "test").rglob("*.png"))
    for i, path in enumerate(tests):
        shutil.copy(path, frames / f"{i:02d}-{path.parent.name}.png")
    (frames / "99-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    n = len(tests) + 1
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    sub = subscribers(mosquitto, prefix=PREFIX)
    # A watched folder is a live source: the agent keeps serving the page once every file is judged.
    source = {"kind": "folder", "path": str(frames), "watch": True, "settle_s": 0.0, "poll_s": 0.2}
    proc = start_agent(write_config(tmp_path, mosquitto, padim_bundle.path, source, http={"listen": str(port)}))
    try:
        sub.wait_for(lambda: len(sub.verdict_ids()) == n, f"{n} verdicts")
        received = Counter(json.loads(m.payload)["status"] for m in sub.on(f"{PREFIX}/verdict"))
        assert received["error"] == 1 and received["ok"] + received["ng"] == n - 1
        wait_until(lambda: json.loads(get(url + "api/state")[2])["frames"] == n, "the page's figures")

        dom = page_dom(url, tmp_path / "chrome-profile")
        on_page = {status: int(shown(dom, f"count-{status}")) for status in ("ok", "ng", "error")}
        assert on_page == {status: received[status] for status in ("ok", "ng", "error")}
        assert int(shown(dom, "count-frames")) == n
        assert shown(dom, "broker").lower() == "connected" and shown(dom, "model") == padim_bundle.manifest.model_id
        overlays = re.findall(r'<img src="(/images/overlay/[^"]+)"', dom)
        assert overlays and get(url.rstrip("/") + overlays[0])[1] == "image/jpeg"

        families = metrics(url)
        for status in ("ok", "ng", "error"):
            assert sample(families, "inspection_frames_total", status=status) == received[status]
        assert sample(families, "inspection_stage_seconds_count", stage="total") == n
        assert sample(families, "inspection_mqtt_connected") == 1
        assert json.loads(get(url + "healthz")[2])["status"] == "ok"
    finally:
        proc.terminate()
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-3000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # the server went with the agent


def test_an_address_in_use_is_one_line_and_exit_2(mosquitto, padim_bundle, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, mosquitto, padim_bundle.path, {"kind": "synthetic", "count": 1},
                              http={"listen": f"127.0.0.1:{port}"})
        r = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                           cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=WAIT_S * 4)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("config error: ")]
    assert f"{config}: agent.http.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in line
