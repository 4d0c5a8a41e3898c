"""Evaluating a bundle on an MVTec-layout test set: metrics per defect type, JSON and a report."""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from calibration.data import read_image, read_mask, test_samples
from calibration.metrics import GOOD, compute_metrics
from calibration.report import write_report
from engines.bundle import Bundle
from engines.pipeline import Pipeline

Frame = tuple[str, str, np.ndarray, np.ndarray]  # name, defect type ("good"), BGR image, bool mask


@dataclass
class Evaluation:
    metrics: dict[str, Any]          # {"overall": MetricSet, "per_type": {...}}
    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray                 # (N, h, w) at the evaluation size
    masks: np.ndarray
    images: list[np.ndarray]
    names: list[str]
    ms_per_image: float
    mask: dict[str, Any] | None = None  # the object mask applied ({kind, outcomes, without_mask}); None: none

    def summary(self, bundle: Bundle, backend: str) -> dict[str, Any]:
        overall = self.metrics["overall"].to_dict()
        return {**overall, "per_type": {k: v.to_dict() for k, v in self.metrics["per_type"].items()},
                "model_id": bundle.manifest.model_id, "method": bundle.manifest.method, "backend": backend,
                "threshold": bundle.manifest.decision.image_threshold, "ms_per_image": self.ms_per_image,
                "tiled": bundle.manifest.model.tiling.enabled, "mask": self.mask}


def eval_size(bundle: Bundle, first_image_hw: tuple[int, int], longest: int = 512) -> tuple[int, int]:
    """Maps are compared at the model input size, or for tiled models at the frame's aspect."""
    if not bundle.manifest.model.tiling.enabled:
        return bundle.manifest.input_hw
    h, w = first_image_hw
    f = min(1.0, longest / max(h, w))
    return max(1, int(round(h * f))), max(1, int(round(w * f)))


def evaluate(bundle: Bundle, pipeline: Pipeline, data: Path, progress: bool = True) -> Evaluation:
    """The bundle on DATA/test (masks from DATA/ground_truth)."""
    samples = test_samples(data)
    frames = ((f"{s.defect_type}/{s.path.name}", s.defect_type, img, read_mask(s, img.shape[:2]))
              for s in samples for img in [read_image(s.path)])
    return evaluate_frames(bundle, pipeline, frames, len(samples), progress)


def evaluate_frames(bundle: Bundle, pipeline: Pipeline, frames: Iterable[Frame], n: int,
                    progress: bool = True) -> Evaluation:
    """The bundle on ``n`` labelled frames (name, defect type or "good", BGR image, bool mask),
    read one at a time: DATA/test, or held-out good images with synthetic defects (calibration/validate.py)."""
    size: tuple[int, int] | None = None
    scores, maps, masks, images, names, types = [], [], [], [], [], []
    raw_scores, raw_maps = [], []  # before the object mask, where there is one
    elapsed = 0.0
    for name, defect_type, img, mask in tqdm(frames, total=n, desc="evaluate", unit="img", disable=not progress,
                                             leave=False):
        size = size or eval_size(bundle, img.shape[:2])
        t = time.perf_counter()
        fs = pipeline.score_frame(img)
        elapsed += time.perf_counter() - t
        scores.append(fs.score)
        maps.append(cv2.resize(fs.map, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
        if fs.unmasked_map is not None:
            raw_maps.append(cv2.resize(fs.unmasked_map, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
            raw_scores.append(fs.unmasked_score)
        masks.append(cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                     .astype(bool))
        images.append(cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA))
        names.append(name)
        types.append(defect_type)
    labels = np.array([int(t != GOOD) for t in types])
    maps_arr = np.stack(maps).astype(np.float32)
    masks_arr = np.stack(masks)
    metrics = compute_metrics(np.array(scores), labels, maps_arr, masks_arr, types, progress=progress)
    mask = None
    if pipeline.mask is not None:
        without = compute_metrics(np.array(raw_scores), labels, np.stack(raw_maps).astype(np.float32), masks_arr,
                                  types)
        mask = _mask_info(bundle, pipeline, without["overall"].to_dict())
    return Evaluation(metrics, np.array(scores), labels, maps_arr, masks_arr, images, names,
                      1000.0 * elapsed / len(scores), mask)


def _mask_info(bundle: Bundle, pipeline: Pipeline, without: dict[str, Any]) -> dict[str, Any]:
    """How the mask found the part (frames per outcome: homography, learnt, all, roi) and the
    overall metrics of the same run without it."""
    spec = bundle.manifest.model.mask
    return {"kind": spec.kind, "outside_weight": spec.outside_weight,
            "outcomes": dict(getattr(pipeline.mask, "counts", {})), "without_mask": without}


def write_outputs(ev: Evaluation, bundle: Bundle, backend: str, report: Path | None) -> dict[str, Any]:
    summary = ev.summary(bundle, backend)
    if report is not None:
        write_report(report, ev.metrics, ev.scores, ev.labels, ev.maps, ev.masks, ev.images, ev.names,
                     bundle.manifest.decision.image_threshold, f"{bundle.manifest.model_id} ({backend})",
                     mask=ev.mask, tap_search=bundle.manifest.score_stats.get("tap_search"))
        (report / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
