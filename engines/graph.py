"""The engine graph: what is exported to ONNX and compiled, around every method's network.

Input is what a camera gives: a batch of uint8 tiles, (B, H, W, 3) BGR. The graph converts it
to the normalised RGB float tensor the network was trained on, so the host ships uint8 (a
quarter of the bytes) and no runtime repeats the normalisation outside the compiled graph.
Outputs are the method network's outputs (a list of tensors), read by the method's head.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from engines.backbones import NORMALISATION, FeatureNet, FeatureSpec, make_backbone

if TYPE_CHECKING:
    from engines.model import ModelSpec

__all__ = ["EngineGraph", "build_engine", "feature_network", "pretrained_graph"]


class EngineGraph(nn.Module):
    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) BGR -> normalised (B, 3, H, W) RGB, in the graph's float type."""
        x = x.permute(0, 3, 1, 2).flip(1).to(self.mean.dtype)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.network(self.normalise(x))
        return list(out) if isinstance(out, (tuple, list)) else [out]


def build_engine(spec: "ModelSpec", pretrained: bool = False, weights: str | None = None) -> EngineGraph:
    """The method's network inside the graph; random weights unless ``pretrained`` (fitting), the
    bundle's network.safetensors is loaded on top of it at run time."""
    from engines.methods import METHODS

    network = METHODS.load(spec.method.kind).network(spec, pretrained=pretrained, weights=weights)
    mean, std = NORMALISATION[spec.backbone]
    return EngineGraph(network, mean, std).eval()


def pretrained_graph(spec: "ModelSpec", network: Callable[..., nn.Module], weights: Path | None,
                     device: torch.device | str = "cpu") -> EngineGraph:
    """The engine graph for fitting: the method's ``network`` with the backbone's pretrained weights."""
    mean, std = NORMALISATION[spec.backbone]
    built = network(spec, pretrained=True, weights=str(weights) if weights else None)
    return EngineGraph(built, mean, std).to(device).eval()


def feature_network(spec: "ModelSpec", pool: int = 1, pretrained: bool = False,
                    weights: str | None = None) -> FeatureNet:
    """The backbone's taps, resized to the finest and concatenated (locally averaged by ``pool``)."""
    backbone = make_backbone(spec.backbone, Path(weights) if weights else None, pretrained=pretrained)
    return FeatureNet(backbone, FeatureSpec(spec.backbone, tuple(spec.taps), pool))
