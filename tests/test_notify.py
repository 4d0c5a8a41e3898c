"""sd_notify: datagrams reach a socket bound the way systemd binds NOTIFY_SOCKET."""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import notify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = f"inspection-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield sock
    sock.close()


def test_ready_and_watchdog(notify_socket: socket.socket) -> None:
    assert notify.ready("engine warm\nPadiM on cpu")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=engine warm PadiM on cpu"
    assert notify.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert notify.status("flushing spool")
    assert notify_socket.recv(4096) == b"STATUS=flushing spool"


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.watchdog() is False


def test_unreachable_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify.watchdog() is False


def test_watchdog_interval_is_half_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert notify.watchdog_interval_s() == pytest.approx(10.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval_s() == pytest.approx(10.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert notify.watchdog_interval_s() is None
