"""Configuration: typed loading, and one clear line with exit status 2 for every mistake."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import Config, ConfigError, load_config, preflight

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_the_models_defaults_and_documents_every_key() -> None:
    from agent.reference import REFERENCE_MD, config_yaml, reference_md

    path = REPO / "config.yaml"
    assert path.read_text() == config_yaml(), "config.yaml is stale: python -m agent.reference --write"
    assert REFERENCE_MD.read_text() == reference_md(), "docs/configuration.md is stale: python -m agent.reference --write"
    assert load_config(path) == Config()  # the file holds exactly the defaults
    undocumented = [line.split(":")[0].strip() for line in path.read_text().splitlines()
                    if ":" in line and not line.lstrip().startswith("#") and " # " not in line]
    assert not undocumented, f"config.yaml keys without a comment: {undocumented}"


@pytest.mark.parametrize("text, expected", [
    ("model:\n  methd: padim\n", ":2: unknown key 'model.methd'"),
    ("model:\n  method:\n    dims: many\n", ":3: model.method.dims: expected an integer, got 'many'"),
    ("model:\n  method: magic\n", ":2: model.method: expected kind one of 'algan'"),
    ("model:\n  method:\n    kind: gan\n    dims: 3\n", ":4: unknown key 'model.method.dims'"),
    ("source:\n  kind: camera\n  url: rtsp://x\n", ":3: unknown key 'source.url'"),
    ("runtime:\n  backend:\n    kind: torch\n    half: 1\n", ":4: runtime.backend.half: expected true or false"),
    ("model:\n  input_size: [250, 256]\n", ":2: model.input_size: expected [height, width], positive multiples"),
    ("mqtt:\n  port: 70000\n", ":2: mqtt.port: expected at most 65535, got 70000"),
    ("model: [1, 2]\n", ":1: model: expected a mapping, got list"),
    ("model: {\n", ":2:1: not valid YAML"),
    ("source:\n  fps: 1\nmqtt:\n  qos: true\n", ":4: mqtt.qos: expected an integer, got True"),
    ("agent:\n  image_max_side: true\n", ":2: agent.image_max_side: expected an integer, got True"),
    ("mqtt:\n  health_interval_s: 0\n", ":2: mqtt.health_interval_s: expected more than 0"),
    ("source:\n  reconnect_min_s: -1\n", ":2: source.reconnect_min_s: expected more than 0"),
    ("runtime:\n  threads: -2\n", ":2: runtime.threads: expected at least 0, got -2"),
    ("runtime:\n  device: gpu0\n", ":2: runtime.device: expected auto, cpu, cuda or cuda:N, got 'gpu0'"),
    ("agent:\n  archive_dir: /tmp/a\n", ":2: unknown key 'agent.archive_dir' (expected one of: model, name, "),
    ("agent:\n  archive:\n    max_bytes: 0\n", ":3: agent.archive.max_bytes: expected at least 1, got 0"),
    ("agent:\n  archive:\n    every_ok: -1\n", ":3: agent.archive.every_ok: expected at least 0, got -1"),
    ("agent:\n  http:\n    listen: localhost\n", ":3: agent.http.listen: expected \"PORT\", \"HOST:PORT\""),
    ("agent:\n  http:\n    listen: ::1:80\n", ":3: agent.http.listen: expected \"PORT\""),
    ("mqtt:\n  images: some\n", ":2: mqtt.images: expected one of 'ng', 'all' or 'none', got 'some'"),
    ("mqtt:\n  topic_prefix: a/b\n  image_prefix: a/b/img\n", ":3: mqtt.image_prefix: expected a tree apart "),
    ("model:\n  mask:\n    kind: roi\n", ":2: model.mask.polygons: kind 'roi'"),
    ("model:\n  taps: [stage3, 4]\n", ":2: model.taps[1]: expected a string, got 4"),
])
def test_bad_config_names_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}{expected}"), str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("agent:\n  model: /no/such/bundle\n", ":2: agent.model: bundle directory not found: /no/such/bundle"),
    ("source:\n  kind: folder\n  path: /no/such/dir\n", ":3: source.path: not a folder: /no/such/dir"),
    ("mqtt:\n  password_env: NO_SUCH_VARIABLE_XYZ\n", ":2: mqtt.password_env: environment variable"),
    ("mqtt:\n  username: u\n  password_file: missing.txt\n", ":3: mqtt.password_file: cannot read"),
    ("mqtt:\n  tls: true\n  ca_file: ca.pem\n", ":3: mqtt.ca_file: "),
    ("mqtt:\n  spool_path: here\n", ":2: mqtt.spool_path: "),
    ("mqtt:\n  spool_path: config.yaml/spool.sqlite\n", ":2: mqtt.spool_path: "),
    ("model:\n  weights: nothing.pth\n", ":2: model.weights: file not found"),
    ("agent:\n  archive:\n    dir: config.yaml\n", ":3: agent.archive.dir: "),
])
def test_preflight_finds_what_run_would_refuse(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    (tmp_path / "here").mkdir()
    (tmp_path / "config.yaml").write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    with pytest.raises(ConfigError) as e:
        preflight(cfg, path, serving=True)
    assert str(e.value).startswith(f"{path}{expected}"), str(e.value)


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
    path.write_text("model:\n  method:\n    dims: 64\n")
    r = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config", str(path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["model"]["method"] == {"kind": "padim", "dims": 64, "reg": 0.01}
    assert resolved["model"]["backbone"] == "efficientnet_lite0"  # defaults are filled in


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  model: bundle\n")
    assert load_config(path).agent.model == tmp_path / "bundle"


def test_taps_not_given_are_the_methods_own_also_after_the_method_changes() -> None:
    from calibration.settings import ModelConfig
    from engines.model import ModelSpec

    assert ModelConfig().taps == ["stage3", "stage4", "stage5"]
    algan = ModelConfig(method="algan")
    assert algan.taps == ["stage3", "stage4", "stage5", "stage6"]
    # What a bundle's manifest holds reads back the same.
    assert ModelSpec.model_validate(algan.spec().model_dump()).taps == algan.taps
    # calibrate --method swaps the method of a loaded configuration: its taps follow ...
    cfg = ModelConfig()
    cfg.method = "algan"
    assert cfg.taps == ["stage3", "stage4", "stage5", "stage6"]
    # ... unless the configuration gave them.
    given = ModelConfig(taps=["stage4", "stage5"])
    given.method = "algan"
    assert given.taps == ["stage4", "stage5"]
    assert ModelConfig(method="algan", taps="auto").taps == "auto"


def test_a_copy_of_the_shipped_config_switched_to_another_method_takes_that_methods_taps(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    assert "taps" not in data["model"]  # shown commented out: a default that follows the method
    data["model"]["method"] = "algan"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).model.taps == ["stage3", "stage4", "stage5", "stage6"]
