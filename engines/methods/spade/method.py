"""SPADE's network, head and fit.

The network is the backbone's taps (no local averaging). The fit keeps every good image's
pooled feature and its patch features (fp16, at most ``MAX_BANK_BYTES``: beyond that a random
share of the images is kept, and the fit info records the share).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.graph import feature_network, pretrained_graph
from engines.knn import MAX_BANK_BYTES, patches
from engines.methods import FitContext, Fitted
from engines.model import ModelSpec
from engines.training import train_device
from engines.methods.spade import SpadeSettings


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    return feature_network(spec, pool=1, pretrained=pretrained, weights=weights)


def head(spec: ModelSpec, tensors: dict[str, Tensor]) -> nn.Module:
    return SpadeHead(spec.method, tensors)


class SpadeHead(nn.Module):
    """SPADE: image score = mean distance of the pooled feature to its K nearest good images;
    map = each patch's mean distance to its k nearest patches among those K images' patches
    (Cohen and Hoshen 2020). The gallery holds every fitted image's patches (fp16 to halve it)."""

    def __init__(self, settings: SpadeSettings, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.k = settings.neighbours
        self.image_k = settings.image_neighbours
        self.register_buffer("pooled", tensors["pooled"].float())      # (N, D)
        self.register_buffer("gallery", tensors["gallery"])            # (N, P, D), fp16 or fp32
        n, p, _ = self.gallery.shape
        if not 1 <= self.image_k <= n:
            raise ValueError(f"spade image_neighbours={self.image_k} must be in [1, {n}] (gallery images)")
        if not 1 <= self.k <= self.image_k * p:
            raise ValueError(f"spade neighbours={self.k} must be in [1, {self.image_k * p}]")
    def forward(self, outputs: list[Tensor]) -> tuple[Tensor, Tensor]:
        features = outputs[0]
        b, d, h, w = features.shape
        # Image level: a (B, N) block over the N fitted images, small, so done directly.
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1).float()
        to_images = torch.addmm(self.pooled.square().sum(1), pooled, self.pooled.T, alpha=-2.0)
        to_images = (to_images + pooled.square().sum(1, keepdim=True)).clamp_min(0.0)
        nearest_sq, nearest = to_images.topk(self.image_k, dim=1, largest=False)  # (B, K)
        image_dist = nearest_sq.sqrt().mean(1)
        # Patch level: each image against its own K images' patches, all images in one batched block
        # (B x h*w x K*P floats: 21 MB per image at 256 px), which the exported graph can hold too.
        queries = patches(features).reshape(b, h * w, d)
        gallery = self.gallery.index_select(0, nearest.flatten()).float().reshape(b, -1, d)  # (B, K*P, D)
        d2 = torch.baddbmm(gallery.square().sum(2)[:, None, :], queries, gallery.transpose(1, 2), alpha=-2.0)
        d2 = (d2 + queries.square().sum(2, keepdim=True)).clamp_min(0.0)
        dist = d2.topk(self.k, dim=2, largest=False).values.sqrt().mean(2)
        return dist.reshape(b, h, w), image_dist


@torch.inference_mode()
def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    start = time.perf_counter()
    settings: SpadeSettings = spec.method
    device = train_device()
    graph = pretrained_graph(spec, network, context.weights, device)
    gen = torch.Generator().manual_seed(context.seed)
    keep = 1.0
    pooled: list[Tensor] = []
    gallery: list[Tensor] = []
    for x in context.train.batches("spade features"):
        f = graph(x.to(device))[0]
        if not gallery:
            per_input = 2 * f.shape[1] * f.shape[2] * f.shape[3]
            keep = min(1.0, MAX_BANK_BYTES / (per_input * context.train.inputs()))
        if keep < 1.0:
            f = f[torch.rand(f.shape[0], generator=gen) < keep]
        pooled.append(F.adaptive_avg_pool2d(f, 1).flatten(1).float().cpu())
        gallery.append(f.flatten(2).transpose(1, 2).half().cpu())  # (B, h*w, C)
    pooled_t, gallery_t = torch.cat(pooled), torch.cat(gallery)
    if len(pooled_t) < settings.image_neighbours:
        raise ValueError(f"spade needs at least image_neighbours={settings.image_neighbours} fitted images "
                         f"(or tiles), got {len(pooled_t)}")
    return Fitted(network_state={n: t.cpu() for n, t in graph.state_dict().items()},
                  head_tensors={"pooled": pooled_t, "gallery": gallery_t},
                  info={"images": int(gallery_t.shape[0]), "image_share_kept": keep,
                        "patches": int(gallery_t.shape[0] * gallery_t.shape[1]),
                        "fit_s": time.perf_counter() - start, "device": device.type})
