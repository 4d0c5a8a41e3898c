"""Fitting the kNN methods: PatchCore's coreset memory bank and SPADE's gallery of good patches.

Both read the features of the good images once through the exported feature network (the
engine): PatchCore with 3x3 local aggregation (``pool=3``), SPADE without. Memory is bounded:
beyond ``MAX_BANK_BYTES`` of patch features, a random share of each batch (PatchCore) or of
the images (SPADE) is kept, and the fit info records the share.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from calibration.fit import FitResult, register_fitter
from calibration.padim import network_spec
from engines.knn import greedy_coreset
from engines.network import feature_network

if TYPE_CHECKING:
    from calibration.settings import ModelConfig
    from calibration.images import TrainImages

# Patch features held while fitting (fp16), before the coreset: 1 GiB is ~2.3 M patches of 232
# channels, i.e. ~2,200 images at 256 px with stride-8 taps.
MAX_BANK_BYTES = 2**30
# PatchCore's local neighbourhood aggregation: a 3x3 average over the feature grid (the paper's p=3).
PATCHCORE_POOL = 3


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _expected_rows(train: "TrainImages", patches_per_input: int) -> int:
    """Patches the fit set yields (tiles per file taken from the first file)."""
    return len(train.paths) * len(train.model_images(train.paths[0])) * patches_per_input


@torch.inference_mode()
def fit_patchcore(cfg: "ModelConfig", train: "TrainImages", _val: "TrainImages") -> FitResult:
    start = time.perf_counter()
    device = _device()
    spec = network_spec(cfg, pool=PATCHCORE_POOL)
    net = feature_network(spec, pretrained=True).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = 1.0
    chunks: list[torch.Tensor] = []
    for x in train.batches("patchcore features"):
        f = net(x.to(device))
        rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        if not chunks:  # the bound, from the first batch's patch count and width
            limit = MAX_BANK_BYTES // (2 * rows.shape[1])
            keep = min(1.0, limit / _expected_rows(train, f.shape[2] * f.shape[3]))
        if keep < 1.0:
            rows = rows[torch.rand(rows.shape[0], generator=gen) < keep]
        chunks.append(rows.half())
    bank = torch.cat(chunks)
    del chunks
    k = cfg.knn
    selected = greedy_coreset(bank, k.coreset_ratio, k.projection_dim, seed=cfg.seed, progress=train.progress)
    coreset = bank.index_select(0, selected).float().cpu()
    spec.pop("weights", None)  # the bundle carries the weights itself
    return FitResult(
        network=spec, network_state={n: t.cpu() for n, t in net.state_dict().items()},
        head={"neighbours": k.neighbours, "support": k.image_neighbours, "coreset_ratio": k.coreset_ratio,
              "projection_dim": k.projection_dim, "image_score": k.image_score},
        head_tensors={"bank": coreset},
        info={"patches": int(bank.shape[0]), "patch_share_kept": keep, "coreset": int(coreset.shape[0]),
              "fit_s": time.perf_counter() - start, "device": device.type})


@torch.inference_mode()
def fit_spade(cfg: "ModelConfig", train: "TrainImages", _val: "TrainImages") -> FitResult:
    start = time.perf_counter()
    device = _device()
    spec = network_spec(cfg, pool=1)
    net = feature_network(spec, pretrained=True).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = 1.0
    pooled: list[torch.Tensor] = []
    gallery: list[torch.Tensor] = []
    for x in train.batches("spade features"):
        f = net(x.to(device))
        if not gallery:
            per_image = 2 * f.shape[1] * f.shape[2] * f.shape[3]
            keep = min(1.0, MAX_BANK_BYTES / (per_image * _expected_rows(train, 1)))
        if keep < 1.0:
            f = f[torch.rand(f.shape[0], generator=gen) < keep]
        pooled.append(F.adaptive_avg_pool2d(f, 1).flatten(1).float().cpu())
        gallery.append(f.flatten(2).transpose(1, 2).half().cpu())  # (B, h*w, C)
    pooled_t, gallery_t = torch.cat(pooled), torch.cat(gallery)
    if len(pooled_t) < cfg.knn.image_neighbours:
        raise ValueError(f"spade needs at least knn.image_neighbours={cfg.knn.image_neighbours} fitted images "
                         f"(or tiles), got {len(pooled_t)}")
    spec.pop("weights", None)
    return FitResult(
        network=spec, network_state={n: t.cpu() for n, t in net.state_dict().items()},
        head={"neighbours": cfg.knn.neighbours, "image_neighbours": cfg.knn.image_neighbours},
        head_tensors={"pooled": pooled_t, "gallery": gallery_t},
        info={"images": int(gallery_t.shape[0]), "image_share_kept": keep,
              "patches": int(gallery_t.shape[0] * gallery_t.shape[1]),
              "fit_s": time.perf_counter() - start, "device": device.type})


register_fitter("patchcore", fit_patchcore)
register_fitter("spade", fit_spade)
