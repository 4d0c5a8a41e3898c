"""The configuration file, loaded into typed settings and checked before anything starts.

Each part of the product keeps its own settings model next to its code (sources, MQTT, tiling,
masks, thresholds); this module composes them and turns a YAML file into them. Two steps:

- ``load_config``: syntax and types. A mistake is one line naming the file, the line, the key
  and what was expected (``ConfigError``).
- ``preflight``: what the machine must provide for the settings to work (files that must exist
  and parse, a writable spool, the password's source, the bundle, the device). ``check-config``
  and ``run`` both call it, so ``check-config`` finds everything ``run`` would refuse.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from agent import overlay
from agent.archive import ArchiveSettings
from agent.http import HttpSettings
from agent.mqtt import MqttConfig
from agent.opcua import OpcuaSettings
from agent.sources import SOURCES, SourceSettings
from calibration.settings import ModelConfig
from engines.runtimes import RuntimeSettings
from engines.settings import ConfigPath, SettingError, Settings, describe, dump, line_of

__all__ = ["Config", "ConfigError", "ModelConfig", "describe", "load_config", "preflight", "to_dict"]


class ConfigError(ValueError):
    """A configuration mistake; the message is one line naming file and key."""


class AgentConfig(Settings):
    model: ConfigPath | None = Field(None, description="bundle directory to serve (required by `run`)")
    name: str = Field("inspection-agent", min_length=1, description="name in logs, status, health and the page")
    image_max_side: int = Field(overlay.MAX_SIDE, ge=16, description="overlays and heatmaps (MQTT, archive, "
                                                                     "page) are at most this long")
    stop_timeout_s: float = Field(5.0, gt=0.0, description="SIGTERM: time allowed to inspect captured frames "
                                                           "and flush before exit")
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings,
                                     description="NG archive on local disk, with retention")
    http: HttpSettings = Field(default_factory=HttpSettings, description="live page, /metrics and /healthz")


class Config(Settings):
    model: ModelConfig = Field(default_factory=ModelConfig,
                               description="calibration: how a bundle is fitted (inspection-agent calibrate)")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings,
                                     description="how a bundle is run (agent, evaluate, bench)")
    source: SOURCES.field("synthetic") = Field(  # type: ignore[valid-type]
        default_factory=SOURCES.default_settings("synthetic"),
        description="where frames come from (inspection-agent run): kind: and that kind's own keys")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="delivery to PLC/SCADA (topics: see README)")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="the service")
    opcua: OpcuaSettings = Field(default_factory=OpcuaSettings,
                                 description="OPC UA server: the station's last verdict, counts, health, Trigger")


def load_config(path: Path | None) -> Config:
    """Read and validate ``path`` (None: the built-in defaults)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_yaml_where(e)}: not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data, context={"base": path.parent})
    except ValidationError as e:
        raise ConfigError(describe(e, path, _key_lines(text), root=Config)) from None


def preflight(cfg: Config, file: Path | None, *, serving: bool = False) -> None:
    """What ``run`` (``serving``) or any command needs from this machine; ConfigError on the first gap."""
    where = str(file) if file is not None else "built-in defaults"
    lines = _key_lines(Path(file).read_text()) if file is not None and Path(file).is_file() else {}
    checks: list[tuple[str, Any]] = [("model", _model_files), ("mqtt", _mqtt_files), ("source", _source_files),
                                     ("runtime", _runtime_device), ("agent", _agent_archive),
                                     ("opcua", _opcua_files)]
    if serving:
        checks.append(("agent", _agent_bundle))
    for section, check in checks:
        try:
            check(getattr(cfg, section), serving)
        except SettingError as e:
            loc = (section, *e.key.split("."))
            raise ConfigError(f"{where}{line_of(lines, loc)}: {section}.{e.key}: {e.message}") from None


def to_dict(cfg: Settings) -> dict[str, Any]:
    """The resolved configuration as plain data (paths as strings), for printing."""
    return dump(cfg)


# --- preflight checks, one per section ------------------------------------------------------

def _model_files(model: ModelConfig, serving: bool) -> None:
    if model.weights is not None and not Path(model.weights).is_file():
        raise SettingError("weights", f"file not found: {model.weights}")
    if model.mask.kind == "features" and not serving:
        from engines.masks import check_detector

        try:
            check_detector(model.mask.detector)
        except ValueError as e:
            raise SettingError("mask.detector", str(e).removeprefix("mask.detector: ")) from None


def _mqtt_files(mqtt: MqttConfig, serving: bool) -> None:
    from agent.mqtt import check_files

    check_files(mqtt)


def _source_files(source: SourceSettings, serving: bool) -> None:
    from agent.sources import SourceError, open_source

    try:
        open_source(source)  # checked, not started
    except SourceError as e:
        key, _, message = str(e).removeprefix("source.").partition(": ")
        raise SettingError(key, message) from None


def _runtime_device(runtime: RuntimeSettings, serving: bool) -> None:
    if not runtime.device.startswith("cuda"):
        return  # auto and cpu work everywhere; only an explicit GPU needs torch to look
    import torch

    index = int(runtime.device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise SettingError("device", f"{runtime.device} requested, but torch sees {count} CUDA device(s)")


def _opcua_files(opcua: OpcuaSettings, serving: bool) -> None:
    from agent.opcua import check_files

    check_files(opcua)


def _agent_archive(agent: AgentConfig, serving: bool) -> None:
    # Only what can never work: a read-only or full archive is a fault to live with (agent/archive.py).
    folder = agent.archive.dir
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise SettingError("archive.dir", f"{folder} is not a directory")


def _agent_bundle(agent: AgentConfig, serving: bool) -> None:
    from engines.bundle import BundleError, load_bundle

    if agent.model is None:
        raise SettingError("model", "a bundle directory is required to run")
    if not Path(agent.model).is_dir():
        raise SettingError("model", f"bundle directory not found: {agent.model}")
    try:
        load_bundle(agent.model)
    except BundleError as e:
        raise SettingError("model", str(e)) from None


def _key_lines(text: str) -> dict[tuple, int]:
    """(key, path, ...) -> 1-based line of that key in the YAML text."""
    out: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if root is not None:
        walk(root, ())
    return out


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    return " ".join(re.sub(r"\s+", " ", p) for p in (context, problem) if p) or str(e).splitlines()[0]
