"""Fault class 7: validation gaps closed. ``check-config`` finds everything ``run`` refuses, each
as one line naming file, line and key, exit 2, before anything starts."""
from __future__ import annotations

import pytest
import yaml

from fault_helpers import check_config, one_line_error, run_agent, synthetic, write_config

pytestmark = pytest.mark.slow

CASES = {
    "boolean is not an integer": ({"mqtt": {"qos": True}}, "mqtt.qos: expected an integer, got True"),
    "interval must be positive": ({"mqtt": {"health_interval_s": 0}}, "mqtt.health_interval_s: expected more than 0"),
    "timeout must be positive": ({"agent": {"stop_timeout_s": -1}}, "agent.stop_timeout_s: expected more than 0"),
    "negative thread count": ({"runtime": {"threads": -4}}, "runtime.threads: expected at least 0"),
    "unknown device": ({"runtime": {"device": "gpu0"}}, "runtime.device: expected auto, cpu, cuda or cuda:N"),
    "absent CUDA device": ({"runtime": {"device": "cuda:7"}}, "runtime.device: cuda:7 requested"),
    "password variable unset": ({"mqtt": {"username": "u", "password_env": "NO_SUCH_VARIABLE_SET"}},
                                "mqtt.password_env: environment variable NO_SUCH_VARIABLE_SET is not set"),
    "bad CA file": ({"mqtt": {"tls": True, "ca_file": "ca.pem"}}, "mqtt.ca_file: "),
    "frame limit": ({"source": {"max_pixels": 10}}, "source.max_pixels: expected at least 1024"),
    "archive that is a file": ({"agent": {"archive": {"dir": "ca.pem"}}}, "agent.archive.dir: "),
    "bad HTTP address": ({"agent": {"http": {"listen": "localhost"}}}, "agent.http.listen: expected"),
}


def merged(base: dict, change: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in change.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_run_and_check_config_refuse_alike(mosquitto, padim_bundle, tmp_path, case) -> None:
    change, expected = CASES[case]
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    config = write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(3))
    config.write_text(yaml.safe_dump(merged(yaml.safe_load(config.read_text()), change)))
    for code, log in (check_config(config), run_agent(config)):
        assert code == 2, log[-2000:]
        line = one_line_error(log)
        assert line.startswith(f"config error: {config}:") and expected in line, line


def test_yaml_syntax_error_keeps_line_and_column(mosquitto, padim_bundle, tmp_path) -> None:
    config = write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(3))
    config.write_text(config.read_text() + "source:\n  fps: [1, 2\n")
    code, log = check_config(config)
    assert code == 2
    line = one_line_error(log)
    assert f"{config}:" in line and "not valid YAML" in line
    where = line.split(f"{config}:", 1)[1].split(":")
    assert where[0].isdigit() and where[1].isdigit()  # line and column
