"""PatchCore's network, head and fit.

The network is the backbone's taps with PaDiM-like 3x3 local averaging (the paper's p=3), so
each patch feature carries its neighbourhood. The fit gathers patch features of the good
images (at most ``MAX_BANK_BYTES``: beyond that a random share of each batch is kept, and the
fit info records the share), then keeps a greedy coreset of ``coreset_ratio`` of them.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from engines.graph import feature_network, pretrained_graph
from engines.knn import MAX_BANK_BYTES, SEARCH_BYTES, KnnIndex, greedy_coreset, patches, sq_distances
from engines.methods import FitContext, Fitted
from engines.model import ModelSpec
from engines.training import train_device
from engines.methods.patchcore import PatchcoreSettings

# PatchCore's local neighbourhood aggregation: a 3x3 average over the feature grid.
POOL = 3


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    return feature_network(spec, pool=POOL, pretrained=pretrained, weights=weights)


def head(spec: ModelSpec, tensors: dict[str, Tensor]) -> nn.Module:
    return PatchCoreHead(spec.method, tensors["bank"])


class PatchCoreHead(nn.Module):
    """PatchCore: distance to the nearest coreset patch; image score reweighted as in the paper.

    The reweighting (Roth et al. 2022, eq. 7): for the most anomalous test patch m, with nearest
    bank patch m*, the score s* = ||m - m*|| is scaled by 1 - softmax over the distances from m to
    m* and to m*'s ``support - 1`` nearest bank neighbours, taken at m*. A test patch that sits
    near a dense region of the bank keeps less of its score than one near an isolated bank patch.
    """

    def __init__(self, settings: PatchcoreSettings, bank: Tensor) -> None:
        super().__init__()
        self.k = settings.neighbours
        self.support = settings.support
        self.register_buffer("bank", bank.float())
        if not 1 <= self.k <= len(self.bank):
            raise ValueError(f"patchcore neighbours={self.k} must be in [1, {len(self.bank)}] (bank size)")
        self.support = max(1, min(self.support, len(self.bank)))
        # "map_max": no head score, so the frame score is the blurred map's maximum (as PaDiM's);
        # on MTD that ranked images better than the reweighted patch score (0.958 vs 0.939 AUROC).
        self.image_score = settings.image_score
        self.index = KnnIndex(self.bank, SEARCH_BYTES)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.index = KnnIndex(self.bank, SEARCH_BYTES)  # norms on the bank's new device
        return self

    def forward(self, outputs: list[Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        features = outputs[0]
        b, d, h, w = features.shape
        queries = patches(features)
        if torch.jit.is_tracing():
            # The exported graph takes the bank as an input of any size: one distance block, where
            # the torch runtime walks the bank in chunks sized for it (engines/knn.py).
            sq_norms = self.bank.square().sum(1)
            d2 = torch.addmm(sq_norms, queries, self.bank.T, alpha=-2.0) + queries.square().sum(1, keepdim=True)
            dist = d2.clamp_min(0).topk(self.k, dim=1, largest=False).values.sqrt().mean(1).reshape(b, h * w)
        else:
            sq_norms = self.index.sq_norms
            dist = self.index.search(queries, self.k).mean(1).reshape(b, h * w)
        if self.image_score == "map_max":
            return dist.reshape(b, h, w)
        score, worst = dist.max(1)
        worst_q = queries.reshape(b, h * w, d).gather(1, worst.view(b, 1, 1).expand(b, 1, d))[:, 0]  # (B, D)
        return dist.reshape(b, h, w), score * self._weight(worst_q, sq_norms)

    def _weight(self, q: Tensor, sq_norms: Tensor) -> Tensor:
        # B queries against the bank: a (B, M) block, B = the batch (small), so this stays small.
        nearest = torch.addmm(sq_norms, q, self.bank.T, alpha=-2.0).argmin(1)  # m*
        centre = self.bank.index_select(0, nearest)
        to_centre = torch.addmm(sq_norms, centre, self.bank.T, alpha=-2.0)
        support = to_centre.topk(self.support, dim=1, largest=False).indices  # N_b(m*), m* first
        support[:, 0] = nearest  # ties (duplicate bank rows) must not displace m* itself
        dist = sq_distances(q, self.bank[support]).clamp_min(0).sqrt()  # (B, support)
        return 1.0 - torch.softmax(dist, dim=1)[:, 0]


@torch.inference_mode()
def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    start = time.perf_counter()
    settings: PatchcoreSettings = spec.method
    device = train_device()
    graph = pretrained_graph(spec, network, context.weights, device)
    gen = torch.Generator().manual_seed(context.seed)
    keep, chunks, seen = 1.0, [], 0
    for x in context.train.batches("patchcore features"):
        rows = patches(graph(x.to(device))[0])
        if not chunks:  # the bound, from the first batch's patch width and the set's size
            rows_per_input = len(rows) // len(x)
            keep = min(1.0, MAX_BANK_BYTES / (2 * rows.shape[1] * rows_per_input * context.train.inputs()))
        seen += len(rows)
        if keep < 1.0:
            rows = rows[torch.rand(rows.shape[0], generator=gen) < keep]
        chunks.append(rows.half())
    bank = torch.cat(chunks)
    del chunks
    selected = greedy_coreset(bank, settings.coreset_ratio, settings.projection_dim, seed=context.seed,
                              progress=context.progress)
    coreset = bank.index_select(0, selected).float().cpu()
    return Fitted(network_state={n: t.cpu() for n, t in graph.state_dict().items()},
                  head_tensors={"bank": coreset},
                  info={"patches": seen, "patch_share_kept": keep, "coreset": int(coreset.shape[0]),
                        "fit_s": time.perf_counter() - start, "device": device.type})

