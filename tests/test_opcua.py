"""The OPC UA server end to end: the `run` command with a trigger source and `opcua:` enabled; an
asyncua client (Basic256Sha256, SignAndEncrypt, a certificate of its own) calls Trigger and reads the
last verdict, and is refused without credentials, with a wrong password and without security."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import free_port
from test_service import PREFIX, finish, start_agent, write_config

STATION = "line7-cam1"
NAMESPACE = "urn:inspection-agent"
PASSWORD = "s3cret-for-the-test"


async def client_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "client.der", folder / "client.pem"
    await setup_self_signed_certificate(key, cert, "urn:test:opcua-client", "localhost",
                                        [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "test client"})
    return cert, key


async def secure_client(url: str, cert: Path, key: Path, user: str | None, password: str | None) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = "urn:test:opcua-client"  # as in its certificate
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    return client


async def session(url: str, tmp_path: Path) -> dict[str, Any]:
    cert, key = await client_certificate(tmp_path)
    seen: dict[str, Any] = {}
    client = await secure_client(url, cert, key, "plc", PASSWORD)
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)
        station = client.get_node(ua.NodeId(STATION, idx))
        seen["trigger"] = await station.call_method(ua.NodeId(f"{STATION}.Trigger", idx), "P-4711")
        for name in ("Status", "PartId", "FrameId", "ModelId", "ImageScore", "Timestamp"):
            seen[name] = await client.get_node(ua.NodeId(f"{STATION}.LastVerdict.{name}", idx)).read_value()
        seen["frames"] = await client.get_node(ua.NodeId(f"{STATION}.Counts.Frames", idx)).read_value()
        state = client.get_node(ua.NodeId(f"{STATION}.Health.State", idx))
        for _ in range(100):  # written every second by the server
            seen["state"] = await state.read_value()
            if seen["state"] == "serving":
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ua.UaStatusCodeError):  # an empty part id is refused
            await station.call_method(ua.NodeId(f"{STATION}.Trigger", idx), "")
    for user, password in ((None, None), ("plc", "wrong")):
        with pytest.raises(Exception) as refused:
            async with await secure_client(url, cert, key, user, password):
                pass
        seen[f"refused {user}"] = repr(refused.value)
    with pytest.raises(Exception) as refused:  # no endpoint without security is offered
        async with Client(url, timeout=10):
            pass
    seen["refused without security"] = str(refused.value)
    return seen


def test_client_calls_trigger_and_reads_the_last_verdict_and_is_refused_without_credentials(
        mosquitto, subscribers, padim_bundle, sample_data: Path, tmp_path: Path) -> None:  # noqa: F811
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(min((sample_data / "test" / "good").iterdir()), images / "part.png")
    url = f"opc.tcp://127.0.0.1:{free_port()}/inspection-agent/"
    config = write_config(tmp_path, mosquitto, padim_bundle.path, {
        "kind": "trigger", "image_root": str(images),
        "capture": {"kind": "synthetic", "mode": "free", "count": 0, "fps": 10, "size": [160, 192]}},
        name=STATION)
    cfg = config.read_text() + (f"opcua:\n  enabled: true\n  endpoint: {url}\n  username: plc\n"
                                f"  password_env: TEST_OPCUA_PASSWORD\n  certificate_dir: {tmp_path / 'pki'}\n")
    config.write_text(cfg)
    sub = subscribers(mosquitto, prefix=PREFIX)
    proc = start_agent(config, env={"TEST_OPCUA_PASSWORD": PASSWORD})
    try:
        sub.wait_for(lambda: any(json.loads(m.payload)["state"] == "online" for m in sub.on(f"{PREFIX}/status")),
                     "the agent online")
        seen = asyncio.run(session(url, tmp_path))
    finally:
        proc.terminate()
    finish(proc)
    status, frame_id = seen["trigger"]
    assert status in ("ok", "ng") and frame_id
    assert seen["Status"] == status and seen["FrameId"] == frame_id and seen["PartId"] == "P-4711"
    assert seen["ModelId"] == padim_bundle.manifest.model_id and seen["ImageScore"] == seen["ImageScore"]  # not NaN
    assert seen["frames"] == 1 and seen["state"] == "serving"
    (verdict,) = [json.loads(m.payload) for m in sub.on(f"{PREFIX}/verdict")]
    assert verdict["frame_id"] == frame_id and verdict["part_id"] == "P-4711" and verdict["part_meta"] == {
        "via": "opcua"}
    assert "BadIdentityTokenRejected" in seen["refused None"], seen["refused None"]
    assert "BadUserAccessDenied" in seen["refused plc"], seen["refused plc"]
    key = tmp_path / "pki" / "key.pem"
    assert (tmp_path / "pki" / "cert.der").is_file() and key.stat().st_mode & 0o777 == 0o600


def test_settings_refuse_a_server_nobody_or_everybody_could_use_unsaid() -> None:
    from pydantic import ValidationError

    from agent.opcua import OpcuaSettings

    with pytest.raises(ValidationError, match="a user is needed while allow_anonymous is false"):
        OpcuaSettings(enabled=True)
    with pytest.raises(ValidationError, match="give the user's password"):
        OpcuaSettings(enabled=True, username="plc")
    with pytest.raises(ValidationError, match="opc.tcp://HOST:PORT/PATH"):
        OpcuaSettings(endpoint="http://localhost:4840/")
    assert OpcuaSettings(enabled=True, allow_anonymous=True).security == ["Basic256Sha256_SignAndEncrypt"]
