"""For the fault matrix: the real ``run`` command against a real Mosquitto, and what it left behind.

An ``Agent`` is the service in a subprocess; a thread collects its log lines (stderr) so a test
can wait on a line, send a signal and read the final health record, which the service logs as
one JSON line at every stop (it also reaches the broker, but a test of a broker fault cannot rely
on that).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from conftest import AGENTS

REPO = Path(__file__).resolve().parents[2]
PREFIX = "plant/faults"
WAIT_S = 60.0  # a bound on a hang on a loaded 2-core machine, not a performance claim


def write_config(tmp_path: Path, broker: Any, bundle_dir: Path, source: dict, *, name: str = "agent.yaml",
                 mqtt: dict | None = None, agent: dict | None = None, runtime: dict | None = None) -> Path:
    cfg = {
        "runtime": {"backend": "onnxruntime", "threads": 1, **(runtime or {})},
        "source": source,
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX, "client_id": "agent-faults",
                 "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "health_interval_s": 0.5,
                 "spool_path": str(tmp_path / "spool.sqlite"), **(mqtt or {})},
        "agent": {"model": str(bundle_dir), "stop_timeout_s": 3.0, **(agent or {})},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def synthetic(count: int = 0, fps: float = 0.0, **extra: Any) -> dict:
    return {"kind": "synthetic", "count": count, "fps": fps, "size": [160, 192], "defect_rate": 0.5, "seed": 3,
            **extra}


class Agent:
    """``inspection-agent run`` in a subprocess; its log lines are collected as they come."""

    def __init__(self, config: Path, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config), *args],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        AGENTS.append(self.proc)
        self.lines: list[str] = []
        self.last_line_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self.last_line_at = time.monotonic()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, text: str, count: int = 1) -> None:
        wait_until(lambda: sum(text in line for line in self.lines) >= count or self.proc.poll() is not None,
                   f"{count} log line(s) with {text!r}")
        assert sum(text in line for line in self.lines) >= count, f"agent exited first:\n{self.log[-3000:]}"

    def wait_ready(self) -> None:
        self.wait_log("ready: source")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent did not exit within {timeout} s:\n{self.log[-3000:]}") from None
        self._reader.join(timeout=5)
        return code

    def health(self) -> dict[str, Any]:
        """The health record the service logged when it stopped."""
        records = [line.split("health: ", 1)[1] for line in self.lines if " agent.service: health: " in line]
        assert records, f"no health line in the log:\n{self.log[-3000:]}"
        return json.loads(records[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_agent(config: Path, *args: str, timeout: float = WAIT_S) -> tuple[int, str]:
    """Run to its own end; returns the exit status and the log."""
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stderr


def check_config(config: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(config)], cwd=REPO,
                       capture_output=True, text=True, timeout=WAIT_S)
    return r.returncode, r.stderr


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def verdicts(sub: Any) -> dict[str, dict]:
    """Verdicts received, by frame id (a re-delivered one counts once)."""
    return {json.loads(m.payload)["frame_id"]: json.loads(m.payload) for m in sub.on(f"{PREFIX}/verdict")}


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]
