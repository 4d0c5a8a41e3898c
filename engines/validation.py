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
from engines.ranking import average_precision, roc_auc

__all__ = ["PreparedValidation", "prepare_validation"]

# Masks are compared at this side at most: pixel AP over 10^6 values per epoch, not 10^7.
_MASK_SIDE = 128


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
        maps = [score_maps(self.inputs[i:i + batch_size].to(device)).float().cpu()
                for i in range(0, len(self.inputs), batch_size)]
        return self.error_of(torch.cat(maps))

    def error_of(self, maps: torch.Tensor) -> float:
        """The criterion of (N, h, w) maps already made, one per input in order (a method whose maps
        need statistics of the whole set first)."""
        scores = F.interpolate(maps.float()[:, None], size=self.masks.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
        image = roc_auc(scores.flatten(1).amax(1).numpy(), self.labels.flatten().numpy())
        pixel = average_precision(scores.flatten().numpy(), self.masks.flatten().numpy())
        if image is None or pixel is None:  # a set without defects or without good images
            return float("nan")
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
