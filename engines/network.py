"""Building the engine network (the part that is exported and compiled) from a manifest.

Each network kind registers a builder; methods that train their own network (autoencoders,
GANs) add theirs. A builder returns the module with random weights; the bundle's
network.safetensors is loaded on top, so a bundle never depends on files outside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engines.backbones import FeatureNet, FeatureSpec, make_backbone

# Engine-side modules of the methods with their own networks or heads; each registers itself.
PLUGINS = ("engines.knn_head", "engines.autoencoder", "engines.gan")

Builder = Callable[[dict[str, Any]], nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_network(kind: str, builder: Builder) -> None:
    _BUILDERS[kind] = builder


def build_network(spec: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    kind = spec.get("kind", "features")
    if kind not in _BUILDERS:
        _load_plugins()
    if kind not in _BUILDERS:
        raise ValueError(f"unknown network kind {kind!r}; known: {', '.join(sorted(_BUILDERS))}")
    net = _BUILDERS[kind](spec)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net.eval()


def feature_network(spec: dict[str, Any], pretrained: bool = False) -> FeatureNet:
    weights = Path(spec["weights"]) if spec.get("weights") else None
    backbone = make_backbone(spec["backbone"], weights, pretrained=pretrained)
    return FeatureNet(backbone, FeatureSpec(spec["backbone"], tuple(spec["taps"]), int(spec.get("pool", 1))))


def _load_plugins() -> None:
    # Methods with their own networks register on import; importing here keeps the
    # registry complete for a runtime that only has a bundle in hand.
    import importlib

    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


register_network("features", lambda spec: feature_network(spec, pretrained=False))
