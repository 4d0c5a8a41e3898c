"""The record every method's fitter returns, and the registry of fitters by method name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from calibration.settings import ModelConfig
    from calibration.images import TrainImages


@dataclass
class FitResult:
    network: dict[str, Any]                    # network spec for the manifest (kind, architecture)
    network_state: dict[str, torch.Tensor]     # engine weights
    head: dict[str, Any]                       # head parameters for the manifest
    head_tensors: dict[str, torch.Tensor]      # head statistics
    info: dict[str, Any] = field(default_factory=dict)  # fit time, samples, epochs, ...


Fitter = Callable[["ModelConfig", "TrainImages", "TrainImages"], FitResult]
_FITTERS: dict[str, Fitter] = {}


def register_fitter(method: str, fitter: Fitter) -> None:
    _FITTERS[method] = fitter


def get_fitter(method: str) -> Fitter:
    import importlib

    for mod in ("calibration.padim", "calibration.knn", "calibration.autoencoder", "calibration.gan"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    if method not in _FITTERS:
        raise ValueError(f"method {method!r} is not available; known: {', '.join(sorted(_FITTERS))}")
    return _FITTERS[method]
