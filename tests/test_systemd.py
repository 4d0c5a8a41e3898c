"""The unit file: notify type, watchdog, restart policy, hardening; verified by systemd where present."""
from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "inspection-agent.service"


def unit() -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # systemd keys are case-sensitive
    p.read(UNIT)
    return p


def test_service_contract() -> None:
    s = unit()["Service"]
    assert s["Type"] == "notify"
    assert int(s["WatchdogSec"]) > 0
    assert s["Restart"] == "on-failure"
    assert "run --config" in s["ExecStart"]
    from agent import exit_codes

    assert s["RestartPreventExitStatus"] == str(exit_codes.CONFIG)
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"


def test_hardening_still_allows_camera_and_gpu() -> None:
    text = UNIT.read_text()
    assert "DeviceAllow=char-video4linux rw" in text
    assert "DeviceAllow=char-nvidiactl rw" in text and "DeviceAllow=char-nvidia-uvm rw" in text
    assert "PrivateDevices=yes" not in text  # would hide /dev/video* and /dev/nvidia*
    assert "AF_UNIX" in unit()["Service"]["RestrictAddressFamilies"]  # sd_notify socket


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify() -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    # The install paths do not exist on a build machine; anything else is a real unit error.
    problems = [line for line in (r.stderr + r.stdout).splitlines()
                if line.strip() and "is not executable: No such file or directory" not in line]
    assert not problems, problems
