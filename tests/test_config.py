"""Configuration: typed loading, and one clear line with exit status 2 for every mistake."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_documents_every_key() -> None:
    path = REPO / "config.yaml"
    assert isinstance(load_config(path), Config)
    undocumented = [line.split(":")[0].strip() for line in path.read_text().splitlines()
                    if ":" in line and not line.lstrip().startswith("#") and "#" not in line]
    assert not undocumented, f"config.yaml keys without a comment: {undocumented}"


@pytest.mark.parametrize("text, expected", [
    ("model:\n  methd: padim\n", "unknown key 'model.methd'"),
    ("model:\n  padim:\n    dims: many\n", "model.padim.dims: expected int, got str"),
    ("model:\n  method: magic\n", "model.method: expected one of"),
    ("model:\n  input_size: [250, 256]\n", "model.input_size"),
    ("agent:\n  model: /no/such/bundle\n", "agent.model: file not found: /no/such/bundle"),
    ("mqtt:\n  port: 70000\n", "mqtt.port"),
    ("source:\n  kind: folder\n  path: /no/such/dir\n", "source.path"),
    ("model: [1, 2]\n", "model: expected a mapping"),
    ("model: {\n", "not valid YAML"),
])
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expected in str(e.value)
    assert str(path) in str(e.value)


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("runtime:\n  threads: four\n")
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "runtime.threads" in lines[0] and str(path) in lines[0]


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_check_config_prints_resolved(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  padim:\n    dims: 64\n")
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["model"]["padim"]["dims"] == 64
    assert resolved["model"]["backbone"] == "efficientnet_lite0"  # defaults are filled in


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  model: bundle\n")
    assert load_config(path).agent.model == tmp_path / "bundle"
