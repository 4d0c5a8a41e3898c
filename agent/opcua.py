"""An OPC UA server (``opcua:``, off by default; asyncua): the station's last verdict, counts and
health as variables, and a ``Trigger(PartId)`` method, for SCADA and PLCs that speak OPC UA.

Address space, namespace ``opcua.namespace`` (``urn:inspection-agent`` by default; clients look its
index up by URI), string node ids under the station's name ``S`` (``agent.name``):

``Objects/Stations/S``                      object, ``ns=<i>;s=S``
``S.LastVerdict.{Status, ImageScore, NormalizedScore, Threshold, PartId, FrameId, Timestamp,
ModelId, ModelVersion, Error}``             String / Double / DateTime; NaN scores before the first
                                            verdict and for an error verdict
``S.Counts.{Frames, Ok, Ng, Error}``        UInt64, since the agent started
``S.Health.{State, MqttConnected, LoopAgeSeconds}``  String / Boolean / Double, every second
``S.Trigger(PartId: String) -> (Status: String, FrameId: String)``
                                            inspect a part (the source must be ``trigger``): returns
                                            once it is judged; a refused trigger (paused, queue full,
                                            another source) is ``BadInvalidState``, a verdict later
                                            than ``trigger_timeout_s`` is ``BadTimeout``.

Security: only the endpoints of ``opcua.security`` (Basic256Sha256 with SignAndEncrypt by
default); the server's certificate and key are generated into ``certificate_dir`` when missing or
no longer valid (self-signed, one year). Users: ``username`` with ``password_file`` or
``password_env``; anonymous sessions only when ``allow_anonymous`` is set. Any client certificate
is accepted (its signature and encryption still hold): the password is the access control.

The server runs its own asyncio loop on its own thread; ``publish`` only hands the verdict over.
"""
from __future__ import annotations

import asyncio
import hmac
import importlib.util
import logging
import math
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator

from agent.mqtt import read_password
from agent.sources.trigger import TriggerRequest
from agent.verdict import Inspection, Verdict
from engines.settings import ConfigPath, SettingError, Settings

__all__ = ["OpcuaServer", "OpcuaSettings", "OpcuaStats", "check_files"]

log = logging.getLogger(__name__)
# asyncua logs its standard address space node by node at INFO: thousands of lines per start.
logging.getLogger("asyncua").setLevel(logging.WARNING)

SecurityMode = Literal["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None"]


class OpcuaSettings(Settings):
    enabled: bool = Field(False, description="serve the station over OPC UA")
    endpoint: str = Field("opc.tcp://0.0.0.0:4840/inspection-agent/", description="opc.tcp:// address to listen on")
    namespace: str = Field("urn:inspection-agent", min_length=1, description="namespace URI of the station's nodes")
    security: list[SecurityMode] = Field(default_factory=lambda: ["Basic256Sha256_SignAndEncrypt"], min_length=1,
                                         description="endpoints offered: Basic256Sha256_SignAndEncrypt | "
                                                     "Basic256Sha256_Sign | None (no security: tests only)")
    certificate_dir: ConfigPath = Field(Path("/var/lib/inspection-agent/opcua"),
                                        description="server certificate (cert.der) and key (key.pem), generated "
                                                    "here when missing")
    username: str | None = Field(None, min_length=1, description="the user a client logs in as")
    password_file: ConfigPath | None = Field(None, description="its password, first line of this file ...")
    password_env: str | None = Field(None, min_length=1, description="... or this environment variable")
    allow_anonymous: bool = Field(False, description="also accept sessions without a user (read and Trigger)")
    trigger_timeout_s: float = Field(30.0, gt=0.0, description="Trigger waits this long for the verdict")

    @model_validator(mode="after")
    def _consistent(self) -> "OpcuaSettings":
        if urlparse(self.endpoint).scheme != "opc.tcp" or urlparse(self.endpoint).port is None:
            raise SettingError("endpoint", f"expected opc.tcp://HOST:PORT/PATH, got {self.endpoint!r}")
        if self.password_file is not None and self.password_env is not None:
            raise SettingError("password_file", "give password_file or password_env, not both")
        if self.enabled and not self.allow_anonymous and self.username is None:
            raise SettingError("username", "a user is needed while allow_anonymous is false")
        if self.username is not None and self.password_file is None and self.password_env is None:
            raise SettingError("password_file", "give the user's password: password_file or password_env")
        return self


def check_files(cfg: OpcuaSettings) -> None:
    """The password's source and a certificate folder that exists or can be made."""
    if not cfg.enabled:
        return
    if importlib.util.find_spec("asyncua") is None:
        raise SettingError("enabled", "the OPC UA server needs asyncua: pip install 'inspection-agent[opcua]'")
    read_password(cfg)
    folder = Path(cfg.certificate_dir)
    if folder.exists() and not folder.is_dir():
        raise SettingError("certificate_dir", f"{folder} is not a directory")


@dataclass(frozen=True)
class OpcuaStats:
    running: bool
    triggers: int   # Trigger calls accepted
    refused: int    # Trigger calls refused or timed out


class OpcuaServer:
    """The sink: ``start`` binds (OSError when it cannot), ``publish`` hands verdicts to the server's loop."""

    def __init__(self, cfg: OpcuaSettings, station: str, status: Callable[[], dict[str, Any]],
                 trigger: Callable[[TriggerRequest], str | None]) -> None:
        self.cfg = cfg
        self.station = station
        self._status = status
        self._trigger = trigger
        self._password = read_password(cfg)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._updates: asyncio.Queue[Verdict] | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._counts = {"Frames": 0, "Ok": 0, "Ng": 0, "Error": 0}
        self._triggers = self._refused = 0

    def start(self, timeout_s: float = 30.0) -> None:
        """Generate the certificate if needed, bind and serve; raises OSError when it cannot."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise OSError(f"OPC UA server did not start within {timeout_s:g} s")
        if self._failure is not None:
            raise OSError(str(self._failure)) from self._failure

    def publish(self, inspection: Inspection) -> None:
        loop, updates = self._loop, self._updates
        if loop is not None and updates is not None and not self._stopped.is_set():
            loop.call_soon_threadsafe(updates.put_nowait, inspection.verdict)

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._loop is not None and self._stop is not None and not self._stopped.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)

    @property
    def stats(self) -> OpcuaStats:
        return OpcuaStats(running=self._ready.is_set() and not self._stopped.is_set() and self._failure is None,
                          triggers=self._triggers, refused=self._refused)

    # -- the server's thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start(), or logged once serving
            if not self._ready.is_set():
                self._failure = e
                self._ready.set()
            else:
                log.exception("OPC UA server failed")
        finally:
            self._stopped.set()

    async def _serve(self) -> None:
        from asyncua import Server, ua

        self._loop = asyncio.get_running_loop()
        self._updates = asyncio.Queue()
        self._stop = asyncio.Event()
        server = Server(user_manager=_Users(self.cfg.username, self._password, self.cfg.allow_anonymous))
        await server.init()
        server.set_endpoint(self.cfg.endpoint)
        server.set_server_name(f"inspection-agent {self.station}")
        await server.set_application_uri(f"{self.cfg.namespace}:{self.station}")
        server.set_security_policy([getattr(ua.SecurityPolicyType, "NoSecurity" if mode == "None" else mode)
                                    for mode in self.cfg.security])
        tokens = [ua.UserNameIdentityToken] + ([ua.AnonymousIdentityToken] if self.cfg.allow_anonymous else [])
        server.set_identity_tokens(tokens)
        await self._certificate(server)
        nodes = await self._address_space(server)
        async with server:
            log.info("OPC UA: serving station %s on %s (%s; %s)", self.station, self.cfg.endpoint,
                     ", ".join(self.cfg.security), "anonymous allowed" if self.cfg.allow_anonymous else
                     f"user {self.cfg.username}")
            self._ready.set()
            health = asyncio.create_task(self._health(nodes))
            updates = asyncio.create_task(self._apply_updates(nodes))
            await self._stop.wait()
            health.cancel()
            updates.cancel()

    async def _certificate(self, server: Any) -> None:
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        folder = Path(self.cfg.certificate_dir)
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / "cert.der", folder / "key.pem"
        await setup_self_signed_certificate(key, cert, f"{self.cfg.namespace}:{self.station}", socket.gethostname(),
                                            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                                            {"commonName": f"inspection-agent {self.station}"})
        os.chmod(key, 0o600)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))

    async def _address_space(self, server: Any) -> dict[str, Any]:
        from asyncua import ua

        idx = await server.register_namespace(self.cfg.namespace)
        s = self.station
        stations = await server.nodes.objects.add_folder(ua.NodeId("Stations", idx), ua.QualifiedName("Stations", idx))
        station = await stations.add_object(ua.NodeId(s, idx), ua.QualifiedName(s, idx))
        nodes: dict[str, Any] = {}
        nan, epoch = math.nan, datetime.fromtimestamp(0, timezone.utc)
        groups = {
            "LastVerdict": {"Status": ("", ua.VariantType.String), "ImageScore": (nan, ua.VariantType.Double),
                            "NormalizedScore": (nan, ua.VariantType.Double), "Threshold": (nan, ua.VariantType.Double),
                            "PartId": ("", ua.VariantType.String), "FrameId": ("", ua.VariantType.String),
                            "Timestamp": (epoch, ua.VariantType.DateTime), "ModelId": ("", ua.VariantType.String),
                            "ModelVersion": ("", ua.VariantType.String), "Error": ("", ua.VariantType.String)},
            "Counts": {name: (0, ua.VariantType.UInt64) for name in self._counts},
            "Health": {"State": ("starting", ua.VariantType.String), "MqttConnected": (False, ua.VariantType.Boolean),
                       "LoopAgeSeconds": (0.0, ua.VariantType.Double)},
        }
        for group, variables in groups.items():
            parent = await station.add_object(ua.NodeId(f"{s}.{group}", idx), ua.QualifiedName(group, idx))
            for name, (value, kind) in variables.items():
                nodes[f"{group}.{name}"] = await parent.add_variable(
                    ua.NodeId(f"{s}.{group}.{name}", idx), ua.QualifiedName(name, idx), ua.Variant(value, kind))
        part_id = ua.Argument(Name="PartId", DataType=ua.NodeId(ua.ObjectIds.String), ValueRank=-1,
                              Description=ua.LocalizedText("the part under the camera"))
        outputs = [ua.Argument(Name=name, DataType=ua.NodeId(ua.ObjectIds.String), ValueRank=-1,
                               Description=ua.LocalizedText(text))
                   for name, text in (("Status", "ok | ng | error"), ("FrameId", "the verdict's frame id"))]
        await station.add_method(ua.NodeId(f"{s}.Trigger", idx), ua.QualifiedName("Trigger", idx), self._on_trigger,
                                 [part_id], outputs)
        return nodes

    async def _on_trigger(self, parent: Any, part_id: Any) -> list[Any]:
        from asyncua import ua

        loop = asyncio.get_running_loop()
        judged: asyncio.Future[dict[str, Any]] = loop.create_future()

        def reply(verdict: dict[str, Any]) -> None:  # the inspection thread
            loop.call_soon_threadsafe(lambda: judged.done() or judged.set_result(verdict))

        part = str(part_id.Value if isinstance(part_id, ua.Variant) else part_id)
        why = self._trigger(TriggerRequest(part, {"via": "opcua"}, None, reply=reply)) if part else "empty PartId"
        if why is not None:
            self._refused += 1
            log.warning("OPC UA Trigger for part %r refused: %s", part, why)
            raise ua.UaStatusCodeError(ua.StatusCodes.BadInvalidState)
        self._triggers += 1
        try:
            verdict = await asyncio.wait_for(judged, self.cfg.trigger_timeout_s)
        except TimeoutError:
            self._refused += 1
            raise ua.UaStatusCodeError(ua.StatusCodes.BadTimeout) from None
        return [ua.Variant(verdict["status"], ua.VariantType.String),
                ua.Variant(verdict["frame_id"], ua.VariantType.String)]

    async def _apply_updates(self, nodes: dict[str, Any]) -> None:
        from asyncua import ua

        assert self._updates is not None
        while True:
            v = await self._updates.get()
            self._counts["Frames"] += 1
            self._counts[{"ok": "Ok", "ng": "Ng", "error": "Error"}[v.status]] += 1
            values = {"Status": (v.status, ua.VariantType.String),
                      "ImageScore": (_number(v.image_score), ua.VariantType.Double),
                      "NormalizedScore": (_number(v.normalized_score), ua.VariantType.Double),
                      "Threshold": (_number(v.threshold), ua.VariantType.Double),
                      "PartId": (v.part_id or "", ua.VariantType.String),
                      "FrameId": (v.frame_id, ua.VariantType.String),
                      "Timestamp": (datetime.fromtimestamp(v.timestamp, timezone.utc), ua.VariantType.DateTime),
                      "ModelId": (v.model.id, ua.VariantType.String),
                      "ModelVersion": (v.model.version, ua.VariantType.String),
                      "Error": (v.error or "", ua.VariantType.String)}
            for name, (value, kind) in values.items():
                await nodes[f"LastVerdict.{name}"].write_value(ua.Variant(value, kind))
            for name, count in self._counts.items():
                await nodes[f"Counts.{name}"].write_value(ua.Variant(count, ua.VariantType.UInt64))

    async def _health(self, nodes: dict[str, Any]) -> None:
        from asyncua import ua

        while True:
            try:
                status = self._status()
                await nodes["Health.State"].write_value(ua.Variant(status["state"], ua.VariantType.String))
                await nodes["Health.MqttConnected"].write_value(
                    ua.Variant(bool(status["mqtt"]["connected"]), ua.VariantType.Boolean))
                await nodes["Health.LoopAgeSeconds"].write_value(
                    ua.Variant(float(status["loop_age_s"]), ua.VariantType.Double))
            except Exception:  # the figures are for display; the next second tries again
                log.debug("OPC UA: health update failed", exc_info=True)
            await asyncio.sleep(1.0)


class _Users:
    """asyncua's user manager: the configured user (constant-time compare), or anonymous when allowed."""

    def __init__(self, username: str | None, password: str | None, allow_anonymous: bool) -> None:
        self.username = username
        self.password = password
        self.allow_anonymous = allow_anonymous

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        if username is None:
            return User(role=UserRole.User, name="anonymous") if self.allow_anonymous else None
        if self.username is not None and self.password is not None and hmac.compare_digest(
                username.encode(), self.username.encode()) and hmac.compare_digest(
                (password or "").encode(), self.password.encode()):
            return User(role=UserRole.User, name=username)
        log.warning("OPC UA: login refused for user %r", username)
        return None


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)
