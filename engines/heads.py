"""Heads turn the engine's outputs into an anomaly map, on the same device, without a host copy.

A head is a torch module ``head(outputs, inputs) -> (B, h, w)`` where ``outputs`` are the
engine outputs and ``inputs`` the normalised input batch (reconstruction methods need it).
Each method registers how to build its head from the manifest and the bundle tensors.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from engines.mahalanobis import MahalanobisHead

HeadBuilder = Callable[[dict[str, Any], dict[str, torch.Tensor]], nn.Module]
_HEADS: dict[str, HeadBuilder] = {}


def register_head(method: str, builder: HeadBuilder) -> None:
    _HEADS[method] = builder


def build_head(method: str, params: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    if method not in _HEADS:
        from engines.network import _load_plugins

        _load_plugins()
    if method not in _HEADS:
        raise ValueError(f"no head for method {method!r}; known: {', '.join(sorted(_HEADS))}")
    return _HEADS[method](params, tensors).eval()


class PadimHead(nn.Module):
    def __init__(self, params: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.maha = MahalanobisHead(tensors["mean"], tensors["inv_cov"], tensors["channels"],
                                    half=bool(params.get("half", False)),
                                    factor=str(params.get("factor", "inverse")))

    def forward(self, outputs: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return self.maha(outputs[0])


register_head("padim", PadimHead)
