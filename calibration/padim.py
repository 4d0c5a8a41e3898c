"""PaDiM: per-position Gaussians over backbone features, fitted in one streaming pass."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from engines.tiling import mosaic
from calibration.fit import FitResult, register_fitter
from engines.mahalanobis import GaussianAccumulator
from engines.network import feature_network

if TYPE_CHECKING:
    from calibration.settings import ModelConfig
    from calibration.images import TrainImages


def network_spec(cfg: "ModelConfig", pool: int = 1) -> dict:
    spec = {"kind": "features", "backbone": cfg.backbone, "taps": list(cfg.taps), "pool": pool}
    if cfg.weights is not None:
        spec["weights"] = str(cfg.weights)
    return spec


@torch.inference_mode()
def fit_padim(cfg: "ModelConfig", train: "TrainImages", _val: "TrainImages") -> FitResult:
    start = time.perf_counter()
    spec = network_spec(cfg)
    net = feature_network(spec, pretrained=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    dims = min(cfg.padim.dims, net.channels)
    channels = torch.randperm(net.channels, generator=gen)[:dims].sort().values
    per_position = cfg.tiling.enabled and cfg.tiling.stats == "per_position"
    acc, tiles = None, 0
    # Per tile position: one frame's tiles form one mosaic sample; shared: every tile is a sample.
    groups = train.per_image("padim fit") if per_position else train.batches("padim fit")
    for x in groups:
        feats = net(x)
        if per_position:
            if tiles and len(feats) != tiles:
                raise ValueError(f"tiling.stats per_position needs equal frame sizes: a training image gives "
                                 f"{len(feats)} tiles, the first gave {tiles}")
            tiles, feats = len(feats), mosaic(feats)
        emb = feats.index_select(1, channels).flatten(2)
        if acc is None:
            acc = GaussianAccumulator(emb.shape[-1], dims)
        acc.add(emb)
    mean, inv_cov = acc.finish(cfg.padim.reg)
    spec.pop("weights", None)  # the bundle carries the weights itself
    head = {"dims": dims, "reg": cfg.padim.reg} | ({"tiles": tiles} if per_position else {})
    return FitResult(network=spec, network_state=net.state_dict(), head=head,
                     head_tensors={"mean": mean, "inv_cov": inv_cov, "channels": channels},
                     info={"samples": acc.n, "fit_s": time.perf_counter() - start})


register_fitter("padim", fit_padim)
