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
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from agent.mqtt import MqttConfig
from agent.sources import SourceConfig
from calibration.settings import ModelConfig
from engines.settings import ConfigPath, SettingError, Settings, dump

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "preflight", "to_dict"]


class ConfigError(ValueError):
    """A configuration mistake; the message is one line naming file and key."""


class RuntimeConfig(Settings):
    backend: Literal["auto", "tensorrt", "torch", "onnxruntime"] = Field(
        "auto", description="auto | tensorrt | torch | onnxruntime; auto: TensorRT plan > torch CUDA > "
                            "ONNX Runtime CPU")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = all cores")
    fallback: bool = Field(True, description="if the chosen backend cannot start, fall back to the next one")
    batch_size: int = Field(8, ge=1, description="tiles scored per engine call")
    map_max_side: int = Field(1024, ge=64, description="score maps, regions and heatmaps of larger frames are "
                                                       "computed at most this long; boxes are scaled to frame pixels")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class AgentConfig(Settings):
    model: ConfigPath | None = Field(None, description="bundle directory to serve (required by `run`)")
    name: str = Field("inspection-agent", min_length=1, description="name in logs and health")
    heatmap: bool = Field(True, description="publish a heatmap image per frame")
    heatmap_max_side: int = Field(512, ge=16, description="heatmaps are downscaled to this longest side")
    archive_dir: ConfigPath | None = Field(None, description="not implemented yet: any value is refused")
    stop_timeout_s: float = Field(5.0, gt=0.0, description="SIGTERM: time allowed to inspect captured frames "
                                                           "and flush before exit")

    @model_validator(mode="after")
    def _implemented(self) -> "AgentConfig":
        if self.archive_dir is not None:
            raise SettingError("archive_dir", "the NG archive is not implemented in this version; remove the "
                                              "key (verdicts and heatmaps go to MQTT)")
        return self


class Config(Settings):
    model: ModelConfig = Field(default_factory=ModelConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)


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
        raise ConfigError(describe(e, path, _key_lines(text))) from None


def preflight(cfg: Config, file: Path | None, *, serving: bool = False) -> None:
    """What ``run`` (``serving``) or any command needs from this machine; ConfigError on the first gap."""
    where = str(file) if file is not None else "built-in defaults"
    lines = _key_lines(Path(file).read_text()) if file is not None and Path(file).is_file() else {}
    checks: list[tuple[str, Any]] = [("model", _model_files), ("mqtt", _mqtt_files), ("source", _source_files),
                                     ("runtime", _runtime_device)]
    if serving:
        checks.append(("agent", _agent_bundle))
    for section, check in checks:
        try:
            check(getattr(cfg, section), serving)
        except SettingError as e:
            loc = (section, *e.key.split("."))
            raise ConfigError(f"{where}{_line(lines, loc)}: {section}.{e.key}: {e.message}") from None


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


def _source_files(source: SourceConfig, serving: bool) -> None:
    from agent.sources import SourceError, open_source

    try:
        open_source(source)  # checked, not started
    except SourceError as e:
        key, _, message = str(e).removeprefix("source.").partition(": ")
        raise SettingError(key, message) from None


def _runtime_device(runtime: RuntimeConfig, serving: bool) -> None:
    if not runtime.device.startswith("cuda"):
        return  # auto and cpu work everywhere; only an explicit GPU needs torch to look
    import torch

    index = int(runtime.device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise SettingError("device", f"{runtime.device} requested, but torch sees {count} CUDA device(s)")


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


# --- error messages ---------------------------------------------------------------------------

_EXPECTED = {
    "int_type": "expected an integer", "int_parsing": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list",
    "model_type": "expected a mapping", "dict_type": "expected a mapping", "model_attributes_type": "expected a mapping",
    "path_type": "expected a path",
}

_BOUNDS = {
    "greater_than": "more than {gt}", "greater_than_equal": "at least {ge}",
    "less_than": "less than {lt}", "less_than_equal": "at most {le}",
    "too_short": "at least {min_length} item(s)", "too_long": "at most {max_length} item(s)",
    "string_too_short": "at least {min_length} character(s)", "string_pattern_mismatch": "a value matching {pattern}",
}


def describe(error: ValidationError, file: Path | str, lines: dict[tuple, int] | None = None) -> str:
    """One line for the first error: ``file:line: key: what was expected, got what``."""
    err = error.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    key = _key(loc)
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingError):
        key = f"{key}.{cause.key}" if key else cause.key
        loc = loc + tuple(cause.key.split("."))
        what = cause.message
    elif err["type"] == "extra_forbidden":
        fields = _fields_at(error.title, loc[:-1])
        return (f"{file}{_line(lines, loc)}: unknown key '{key}'"
                + (f" (expected one of: {', '.join(fields)})" if fields else ""))
    elif err["type"] == "literal_error":
        what = f"expected one of {err['ctx']['expected']}, got {err['input']!r}"
    elif err["type"] in _EXPECTED:
        what = f"{_EXPECTED[err['type']]}, got {_shown(err['input'])}"
    elif err["type"] in _BOUNDS:
        what = f"expected {_BOUNDS[err['type']].format(**err['ctx'])}, got {_shown(err['input'])}"
    else:
        what = f"{err['msg'][0].lower()}{err['msg'][1:]}".removeprefix("value error, ")
        what += f", got {_shown(err['input'])}" if "got" not in what and not isinstance(err["input"], dict) else ""
    return f"{file}{_line(lines, loc)}: {key or 'top level'}: {what}"


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(title: str, loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return []
        model = info.annotation
    return list(getattr(model, "model_fields", {}))


def _line(lines: dict[tuple, int] | None, loc: tuple) -> str:
    while lines and loc:
        if loc in lines:
            return f":{lines[loc]}"
        loc = loc[:-1]
    return ""


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
