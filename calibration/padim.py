"""PaDiM: per-position Gaussians over backbone features, fitted in one streaming pass."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from calibration.fit import FitResult, register_fitter
from engines.mahalanobis import GaussianAccumulator
from engines.network import feature_network

if TYPE_CHECKING:
    from agent.config import ModelConfig
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
    acc = None
    for x in train.batches("padim fit"):
        emb = net(x).index_select(1, channels).flatten(2)
        if acc is None:
            acc = GaussianAccumulator(emb.shape[-1], dims)
        acc.add(emb)
    mean, inv_cov = acc.finish(cfg.padim.reg)
    spec.pop("weights", None)  # the bundle carries the weights itself
    return FitResult(network=spec, network_state=net.state_dict(), head={"dims": dims, "reg": cfg.padim.reg},
                     head_tensors={"mean": mean, "inv_cov": inv_cov, "channels": channels},
                     info={"samples": acc.n, "fit_s": time.perf_counter() - start})


register_fitter("padim", fit_padim)
