"""The agent's HTTP server: the live page, ``/metrics`` and ``/healthz``. Off unless
``agent.http.listen`` is set; a bare port listens on the loopback interface only.

Routes (GET):

``/``
    The live page (agent/page.html): last frames and overlays, ok/ng/error counts, frames/s and
    stage times, spool depth, broker and archive state; it polls ``/api/state`` every second.
``/api/state``
    That state as JSON (agent/page.py).
``/images/overlay/{frame_id}``, ``/images/frame/{frame_id}``
    JPEG of a recent frame's overlay or of the frame (frame id percent-encoded); 404 once it is
    no longer among the recent ones.
``/metrics``
    The Prometheus text format (agent/metrics.py).
``/healthz``
    For orchestration: 200 and ``{"status": "ok", ...}`` while the inspection loop turns; 503 and
    ``{"status": "stalled" | "stopping", ...}`` when it has not turned for ``STALE_S`` seconds or
    the agent is stopping.

The server runs in its own thread, a thread per request; the inspection loop never waits for it:
it only hands data over (the recent frames' sink, the health figures), and whatever a request
needs (rendering an overlay, building the metrics) is done on the request's thread. No
authentication: keep it on loopback, or behind a reverse proxy that adds it.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator

from agent import page
from agent.health import Health
from agent.metrics import CONTENT_TYPE, Metrics
from agent.page import RecentFrames
from engines.settings import SettingError, Settings

__all__ = ["STALE_S", "HttpServer", "HttpSettings", "listen_address"]

log = logging.getLogger(__name__)

# /healthz fails once the inspection loop has not turned for this long (systemd's WatchdogSec).
STALE_S = 30.0


class HttpSettings(Settings):
    listen: str | None = Field(None, description='the page, /metrics and /healthz: "PORT" (loopback), "HOST:PORT" '
                                                 'or "[IPv6]:PORT"; null = no HTTP server')
    recent: int = Field(8, ge=1, le=64, description="frames the page shows (each kept in memory while shown)")

    @model_validator(mode="after")
    def _address(self) -> "HttpSettings":
        if self.listen is not None:
            listen_address(self.listen)
        return self


def listen_address(listen: str) -> tuple[str, int]:
    """(host, port) of a ``listen`` setting; a SettingError naming ``listen`` when it is not one."""
    host, sep, port = listen.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = "127.0.0.1" if not sep else host[1:-1] if bracketed else host
    # An IPv6 address without brackets cannot be told from its port.
    if not host or ":" in host and not bracketed or not port.isdigit() or int(port) > 65535:
        raise SettingError("listen", f'expected "PORT", "HOST:PORT" or "[IPv6]:PORT" with a port up to 65535, '
                                     f"got {listen!r}")
    return host, int(port)


class HttpServer:
    """Bound when made (an address in use raises OSError before READY); serves once started.
    ``status()`` is the service's part of the state (identity, source, MQTT, archive, the loop)."""

    def __init__(self, settings: HttpSettings, health: Health, recent: RecentFrames,
                 status: Callable[[], dict[str, Any]]) -> None:
        if settings.listen is None:
            raise ValueError("agent.http.listen is not set")
        self.health, self.recent, self.status = health, recent, status
        self.metrics = Metrics(health, status)
        host, port = listen_address(settings.listen)
        self._server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._server.app = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> None:
        self._thread.start()
        log.info("HTTP: live page on %s (metrics: %smetrics, health: %shealthz)", self.url, self.url, self.url)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def state(self) -> dict[str, Any]:
        return page.state(self.health.figures(), self.status(), self.recent.summaries())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: HttpServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A page closed mid-answer is not worth a traceback on the journal.
        log.debug("HTTP: request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "inspection-agent"

    def do_GET(self) -> None:  # noqa: N802  (the http.server name)
        app = self.server.app
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", page.PAGE_HTML)
        elif path == "/api/state":
            self._json(200, app.state())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE, app.metrics.text())
        elif path == "/healthz":
            state = app.status()
            healthy = state["state"] == "serving" and state["loop_age_s"] < STALE_S
            why = "ok" if healthy else ("stopping" if state["state"] != "serving" else "stalled")
            self._json(200 if healthy else 503, {"status": why, "loop_age_s": state["loop_age_s"],
                                                 "mqtt": state["mqtt"]["state"]})
        elif path.startswith("/images/") and path.count("/") == 3:
            _, _, kind, frame_id = path.split("/")
            data = app.recent.image(unquote(frame_id), kind) if kind in ("overlay", "frame") else None
            if data is None:
                self._send(404, "text/plain; charset=utf-8", b"no such recent frame\n")
            else:
                self._send(200, "image/jpeg", data)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, "application/json", json.dumps(body, separators=(",", ":")).encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the http.server signature)
        log.debug("HTTP: %s %s", self.address_string(), format % args)
