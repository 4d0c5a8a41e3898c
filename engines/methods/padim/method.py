"""PaDiM's network, head and fit.

The network is the backbone's taps with PaDiM's random channel subset taken inside the graph
(a buffer), so only the kept channels leave the engine. The fit is one streaming pass of sums
(engines/mahalanobis.py), never all embeddings in memory. With ``tiling.stats: per_position``
one frame's tiles form one mosaic sample, so every tile position has its own statistics.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from engines.graph import feature_network, pretrained_graph
from engines.mahalanobis import GaussianAccumulator, MahalanobisHead, cholesky_blocks
from engines.methods import FitContext, Fitted
from engines.model import ModelSpec
from engines.tiling import mosaic


class PadimNetwork(nn.Module):
    """Normalised images -> [features (B, dims, h, w)]: the taps, then the channel subset."""

    def __init__(self, spec: ModelSpec, pretrained: bool, weights: str | None) -> None:
        super().__init__()
        self.features = feature_network(spec, pool=1, pretrained=pretrained, weights=weights)
        dims = min(spec.method.dims, self.features.channels)
        self.register_buffer("channels", torch.arange(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).index_select(1, self.channels)


class PadimHead(nn.Module):
    def __init__(self, mean: torch.Tensor, blocks: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.maha = MahalanobisHead(mean, blocks)  # the chol_k among ``blocks``
        self.positions = mean.shape[0]

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        features = outputs[0]
        positions = features.shape[-2] * features.shape[-1]
        if positions != self.positions:
            raise ValueError(f"the features have {positions} positions, the statistics {self.positions}: "
                             "the frame is not the size (or tile grid) the model was calibrated on")
        return self.maha(features)


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    return PadimNetwork(spec, pretrained, weights)


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if "inv_cov" in tensors:  # a bundle calibrated before the Cholesky blocks (its model.onnx takes inv_cov)
        return PadimHead(tensors["mean"], cholesky_blocks(tensors["inv_cov"]))
    return PadimHead(tensors["mean"], tensors)


@torch.inference_mode()
def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    start = time.perf_counter()
    graph = pretrained_graph(spec, network, context.weights)
    net: PadimNetwork = graph.network
    gen = torch.Generator().manual_seed(context.seed)
    chosen = torch.randperm(net.features.channels, generator=gen)[:len(net.channels)].sort().values
    net.channels.copy_(chosen)
    acc, tiles = None, 0
    groups = context.train.per_image("padim fit") if spec.per_position else context.train.batches("padim fit")
    for x in groups:
        feats = graph(x)[0]
        if spec.per_position:
            if tiles and len(feats) != tiles:
                raise ValueError(f"tiling.stats per_position needs equal frame sizes: a training image gives "
                                 f"{len(feats)} tiles, the first gave {tiles}")
            tiles, feats = len(feats), mosaic(feats)
        emb = feats.flatten(2)
        if acc is None:
            acc = GaussianAccumulator(emb.shape[-1], emb.shape[1])
        acc.add(emb)
    if acc is None:
        raise ValueError("padim: no training images")
    mean, inv_cov = acc.finish(spec.method.reg)
    return Fitted(network_state=graph.state_dict(), head_tensors={"mean": mean, **cholesky_blocks(inv_cov)},
                  info={"samples": acc.n, "channels": len(chosen), "tiles": tiles or None,
                        "fit_s": time.perf_counter() - start})
