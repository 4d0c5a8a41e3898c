"""The stopping criterion of trained methods: how well the model finds synthetic defects.

Calibration makes the defects (CutPaste, scar, NSA on held-out good images) and passes them down
as a ``ValidationSet``; no real defect, and nothing of the test set, decides when training stops
or which epoch is kept. The criterion is ``1 - (image AUROC + pixel average precision) / 2``
(lower is better, as ``fit_loop`` expects): image score = the map's peak, as the pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engines.methods import ValidationSet

__all__ = ["PreparedValidation", "auroc", "average_precision", "prepare_validation"]

# Masks are compared at this side at most: pixel AP over 10^6 values per epoch, not 10^7.
_MASK_SIDE = 128


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    labels = labels.bool().flatten()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return float("nan")
    ranks = _average_ranks(scores.flatten().double())
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision (area under the precision-recall curve, step-wise, as scikit-learn's)."""
    labels = labels.bool().flatten()
    pos = int(labels.sum())
    if not pos:
        return float("nan")
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    hits = labels[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / pos)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    first = torch.ones_like(sorted_x, dtype=torch.bool)
    first[1:] = sorted_x[1:] != sorted_x[:-1]
    group = first.cumsum(0) - 1
    counts = torch.bincount(group).double()
    ends = counts.cumsum(0)
    mean_rank = ends - (counts - 1) / 2            # ranks from 1: average of a tie group's ranks
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[group]
    return ranks


@dataclass
class PreparedValidation:
    """The validation inputs passed once through the frozen part of a model (normalisation, backbone),
    so an epoch's check runs only what trains."""

    inputs: torch.Tensor   # prepared model inputs (N, ...) on the CPU
    masks: torch.Tensor    # bool (N, h, w), at most _MASK_SIDE
    labels: torch.Tensor   # bool (N,): a defect was made (from the full-size mask: a thin scar may vanish)

    def error(self, score_maps: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
              device: torch.device) -> float:
        """``1 - (image AUROC + pixel AP) / 2`` of ``score_maps`` (prepared batch -> (B, h, w) maps)."""
        maps = []
        for i in range(0, len(self.inputs), batch_size):
            m = score_maps(self.inputs[i:i + batch_size].to(device)).float()
            maps.append(F.interpolate(m[:, None], size=self.masks.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0].cpu())
        scores = torch.cat(maps)
        image = auroc(scores.flatten(1).amax(1), self.labels)
        pixel = average_precision(scores, self.masks)
        return 1.0 - (image + pixel) / 2


@torch.inference_mode()
def prepare_validation(validation: ValidationSet, prepare: Callable[[torch.Tensor], torch.Tensor],
                       batch_size: int, device: torch.device) -> PreparedValidation:
    """``validation``'s images through ``prepare`` (uint8 batch -> what the trained part reads)."""
    inputs = torch.cat([prepare(validation.images[i:i + batch_size].to(device)).cpu()
                        for i in range(0, len(validation), batch_size)]).clone()
    h, w = validation.masks.shape[-2:]
    side = max(h, w)
    size = (h, w) if side <= _MASK_SIDE else (max(1, h * _MASK_SIDE // side), max(1, w * _MASK_SIDE // side))
    masks = F.interpolate(validation.masks[:, None].float(), size=size, mode="area")[:, 0] >= 0.5
    return PreparedValidation(inputs, masks, validation.masks.flatten(1).any(1))
