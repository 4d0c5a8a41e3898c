"""The configuration file, loaded into typed records and validated before anything starts.

Each part of the product keeps its own dataclass next to its code (sources, MQTT, PaDiM,
thresholds, tiling); this module composes them and turns a YAML file into them, naming the
file, the key and what was expected on any mistake.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.masks import MaskConfig
from agent.mqtt import MqttConfig
from agent.sources import SourceConfig
from agent.tiling import TilingConfig
from calibration.thresholds import ThresholdConfig


class ConfigError(ValueError):
    """A configuration mistake; the message is one line naming file and key."""


@dataclass
class PadimConfig:
    dims: int = 150          # random channel subset kept from the concatenated taps
    reg: float = 0.01        # added to the covariance diagonal


@dataclass
class KnnConfig:
    # 1 %: the greedy coreset of MTD's 445k patches took 27 min on a loaded 2-core CPU at this
    # ratio; 10 % (the paper's other setting) is for a GPU.
    coreset_ratio: float = 0.01
    neighbours: int = 1       # patch-level k
    image_neighbours: int = 5  # SPADE image-level k
    projection_dim: int = 128
    image_score: Literal["reweighted", "map_max"] = "reweighted"  # PatchCore image score


@dataclass
class TrainConfig:
    epochs: int = 10          # upper bound; training stops earlier on the validation criterion
    batch_size: int = 16
    lr: float = 1e-3
    latent_dim: int = 128
    patience: int = 5         # epochs without validation improvement before stopping
    on_features: bool = False


@dataclass
class ModelConfig:
    method: Literal["padim", "spade", "patchcore", "ae-l2", "ae-ssim", "gan", "algan"] = "padim"
    backbone: Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2"] = "efficientnet_lite0"
    weights: Path | None = None   # torchvision-format state dict for the ResNets
    # Stride-8..16 taps: on MTD, [stage3, stage4, stage5] beat [stage2, stage3, stage4] (image AUROC
    # 0.972 vs 0.949, pixel AUPR 0.282 vs 0.258); the last stages add little and cost memory.
    taps: list[str] = field(default_factory=lambda: ["stage3", "stage4", "stage5"])
    input_size: list[int] = field(default_factory=lambda: [256, 256])  # height, width; multiples of 32
    blur_sigma: float = 4.0
    batch_size: int = 8
    holdout: float = 0.2          # share of train/good kept out of the fit for thresholds
    seed: int = 0
    padim: PadimConfig = field(default_factory=PadimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    synthetic_defects: int = 0    # defective images synthesised from held-out good ones to estimate
                                  # the miss rate (and to set an f1 threshold without real defects)


@dataclass
class RuntimeConfig:
    backend: Literal["auto", "tensorrt", "torch", "onnxruntime"] = "auto"
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 0              # CPU threads for torch / ONNX Runtime; 0 = all cores
    fallback: bool = True         # a backend that cannot start falls back to the next in auto order
    batch_size: int = 8           # tiles scored per engine call


@dataclass
class AgentConfig:
    model: Path | None = None     # the bundle directory to serve
    name: str = "inspection-agent"
    heatmap: bool = True          # publish a heatmap image per frame
    heatmap_max_side: int = 512   # heatmaps are downscaled to this longest side
    archive_dir: Path | None = None  # local copy of NG frames and heatmaps; None = off
    stop_timeout_s: float = 5.0   # SIGTERM: time allowed to flush before exit


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)


def load_config(path: Path | None) -> Config:
    """Read and validate ``path`` (None: the built-in defaults)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = _build(Config, data, "", path)
    _check(cfg, path)
    return cfg


def to_dict(cfg: Any) -> Any:
    """The resolved configuration as plain data (paths as strings), for printing."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return str(cfg) if isinstance(cfg, Path) else cfg


def _build(cls: type, data: Any, key: str, file: Path) -> Any:
    where = key or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: {where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"{file}: unknown key '{_join(key, k)}' (expected one of: {', '.join(names)})")
    values = {k: _coerce(hints[k], v, _join(key, k), file) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as e:  # a section's own validation names the key; add the file
        raise ConfigError(f"{file}: {e}") from None


def _coerce(tp: Any, value: Any, key: str, file: Path) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, file)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, file)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{file}: {key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{file}: {key}: expected a path, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (file.parent / p)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{file}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check(cfg: Config, file: Path) -> None:
    """Cross-field rules and files that must exist."""
    h, w = (cfg.model.input_size + [0, 0])[:2]
    if len(cfg.model.input_size) != 2 or h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ConfigError(f"{file}: model.input_size: expected [height, width], positive multiples of 32, "
                          f"got {cfg.model.input_size}")
    if not 0.0 < cfg.model.holdout < 1.0:
        raise ConfigError(f"{file}: model.holdout: expected a fraction between 0 and 1, got {cfg.model.holdout}")
    files = {"model.weights": cfg.model.weights, "agent.model": cfg.agent.model,
             "mqtt.ca_file": cfg.mqtt.ca_file, "mqtt.password_file": cfg.mqtt.password_file}
    if cfg.source.kind in ("folder", "video"):
        files["source.path"] = cfg.source.path
    for key, p in files.items():
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{file}: {key}: file not found: {p}")


def _join(prefix: str, k: Any) -> str:
    return f"{prefix}.{k}" if prefix else str(k)
