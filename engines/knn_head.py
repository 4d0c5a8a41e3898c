"""kNN heads (SPADE, PatchCore): nearest-neighbour distances of patch features to good ones.

Both heads return ``(map (B, h, w), image_score (B,))``: the map is each patch's distance to
its nearest good patches, the image score is the method's own (SPADE: image-level kNN on
globally pooled features; PatchCore: the reweighted maximum patch score).

The memory banks are head buffers, so they follow the head to its device; PatchCore's index
(`KnnIndex`, with the bank's squared norms) is rebuilt whenever the buffers move, once at
start-up, never per frame.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.heads import register_head
from engines.knn import KnnIndex

# Temporaries of one search step stay under this (see engines/knn.py for the bound).
SEARCH_BYTES = 128 * 2**20


def _patches(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B * h * w, C) float32 rows, one per patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()


def _sq_distances(q: Tensor, rows: Tensor) -> Tensor:
    """Squared distances (B, R) of each query (B, D) to each of its own rows (B, R, D)."""
    return (rows.float() - q[:, None, :]).square().sum(-1)


class PatchCoreHead(nn.Module):
    """PatchCore: distance to the nearest coreset patch; image score reweighted as in the paper.

    The reweighting (Roth et al. 2022, eq. 7): for the most anomalous test patch m, with nearest
    bank patch m*, the score s* = ||m - m*|| is scaled by 1 - softmax over the distances from m to
    m* and to m*'s ``support - 1`` nearest bank neighbours, taken at m*. A test patch that sits
    near a dense region of the bank keeps less of its score than one near an isolated bank patch.
    """

    def __init__(self, params: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.k = int(params.get("neighbours", 1))
        self.support = int(params.get("support", 9))
        self.register_buffer("bank", tensors["bank"].float())
        if not 1 <= self.k <= len(self.bank):
            raise ValueError(f"patchcore neighbours={self.k} must be in [1, {len(self.bank)}] (bank size)")
        self.support = max(1, min(self.support, len(self.bank)))
        # "map_max": no head score, so the frame score is the blurred map's maximum (as PaDiM's);
        # on MTD that ranked images better than the reweighted patch score (0.958 vs 0.939 AUROC).
        self.image_score = str(params.get("image_score", "reweighted"))
        if self.image_score not in ("reweighted", "map_max"):
            raise ValueError(f"patchcore image_score must be 'reweighted' or 'map_max', got {self.image_score!r}")
        self.index = KnnIndex(self.bank, SEARCH_BYTES)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.index = KnnIndex(self.bank, SEARCH_BYTES)  # norms on the bank's new device
        return self

    def forward(self, outputs: list[Tensor], inputs: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        features = outputs[0]
        b, d, h, w = features.shape
        queries = _patches(features)
        dist = self.index.search(queries, self.k).mean(1).reshape(b, h * w)
        if self.image_score == "map_max":
            return dist.reshape(b, h, w)
        score, worst = dist.max(1)
        worst_q = queries.reshape(b, h * w, d)[torch.arange(b, device=dist.device), worst]  # (B, D)
        return dist.reshape(b, h, w), score * self._weight(worst_q)

    def _weight(self, q: Tensor) -> Tensor:
        # B queries against the bank: a (B, M) block, B = the batch (small), so this stays small.
        nearest = torch.addmm(self.index.sq_norms, q, self.bank.T, alpha=-2.0).argmin(1)  # m*
        centre = self.bank.index_select(0, nearest)
        to_centre = torch.addmm(self.index.sq_norms, centre, self.bank.T, alpha=-2.0)
        support = to_centre.topk(self.support, dim=1, largest=False).indices  # N_b(m*), m* first
        support[:, 0] = nearest  # ties (duplicate bank rows) must not displace m* itself
        dist = _sq_distances(q, self.bank[support]).clamp_min(0).sqrt()  # (B, support)
        return 1.0 - torch.softmax(dist, dim=1)[:, 0]


class SpadeHead(nn.Module):
    """SPADE: image score = mean distance of the pooled feature to its K nearest good images;
    map = each patch's mean distance to its k nearest patches among those K images' patches
    (Cohen and Hoshen 2020). The gallery holds every fitted image's patches (fp16 to halve it)."""

    def __init__(self, params: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.k = int(params.get("neighbours", 1))
        self.image_k = int(params.get("image_neighbours", 5))
        self.register_buffer("pooled", tensors["pooled"].float())      # (N, D)
        self.register_buffer("gallery", tensors["gallery"])            # (N, P, D), fp16 or fp32
        n, p, _ = self.gallery.shape
        if not 1 <= self.image_k <= n:
            raise ValueError(f"spade image_neighbours={self.image_k} must be in [1, {n}] (gallery images)")
        if not 1 <= self.k <= self.image_k * p:
            raise ValueError(f"spade neighbours={self.k} must be in [1, {self.image_k * p}]")
        # Image-level search is a (B, N) block over the N fitted images: small, so done directly.
        self.register_buffer("pooled_sq", self.pooled.square().sum(1))

    def forward(self, outputs: list[Tensor], inputs: Tensor) -> tuple[Tensor, Tensor]:
        features = outputs[0]
        b, d, h, w = features.shape
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1).float()
        to_images = torch.addmm(self.pooled_sq, pooled, self.pooled.T, alpha=-2.0)
        to_images.add_(pooled.square().sum(1, keepdim=True)).clamp_min_(0.0)
        nearest_sq, nearest = to_images.topk(self.image_k, dim=1, largest=False)  # (B, K)
        image_dist = nearest_sq.sqrt().mean(1)
        queries = _patches(features).reshape(b, h * w, d)
        maps = []
        for i in range(b):  # each image has its own gallery of K images' patches
            gallery = self.gallery.index_select(0, nearest[i]).reshape(-1, d)
            index = KnnIndex(gallery, SEARCH_BYTES, storage_dtype=self.gallery.dtype)
            maps.append(index.search(queries[i], self.k).mean(1))
        return torch.stack(maps).reshape(b, h, w), image_dist


register_head("patchcore", PatchCoreHead)
register_head("spade", SpadeHead)
