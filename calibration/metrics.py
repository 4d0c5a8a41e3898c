"""Evaluation metrics: image AUROC, pixel AUROC, pixel AUPR, AUPRO and image F1-max.

Every curve here is built the same way: rank the items by descending score, take the
cumulative (possibly weighted) positive and negative counts, and read them at the end of
each run of tied scores, so that a threshold `t` always means "NG where score >= t".
AUROC and average precision follow scikit-learn's definitions exactly (trapezoidal ROC,
step-wise AP without interpolation); AUPRO follows the MVTec AD paper and anomalib.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from engines.ranking import (_average_precision, _counts, _descending_order, _ranked_counts, _roc_auc,  # noqa: F401
                             _roc_points, _run_ends, _check_labels, average_precision, roc_auc)

GOOD = "good"


@dataclass
class MetricSet:
    """Metrics of one evaluation set; None where a metric is undefined (no positives)."""

    image_auroc: float | None
    pixel_auroc: float | None
    pixel_aupr: float | None
    aupro: float | None
    f1_max: float | None
    n_images: int
    n_anomalous: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending and led by +inf at (0, 0)."""
    thresholds, tps, fps = _ranked_counts(scores, labels)
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("roc_curve needs both positive and negative labels")
    fpr, tpr = _roc_points(tps, fps)
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def precision_recall_curve(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), thresholds descending so recall rises."""
    thresholds, tps, fps = _ranked_counts(scores, labels)
    if tps[-1] == 0:
        raise ValueError("precision_recall_curve needs at least one positive label")
    return tps / (tps + fps), tps / tps[-1], thresholds


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, f1) of the best F1 where NG means score >= threshold.

    The threshold is an observed score, the highest one among equally good choices.
    """
    thresholds, tps, fps = _ranked_counts(scores, labels)
    if tps[-1] == 0:
        raise ValueError("f1_max_threshold needs at least one positive label")
    f1 = 2 * tps / (tps + fps + tps[-1])
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def pro_auc(score_maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve up to `max_fpr` (AUPRO).

    None when the masks hold no defect region or no normal pixel.
    """
    maps = _check_maps(score_maps, masks)
    _check_max_fpr(max_fpr)
    pixels = _rank_pixels(maps, np.asarray(masks) > 0)
    return _pixel_metrics(pixels, np.ones(len(maps), bool), max_fpr)[2]


def compute_metrics(
    image_scores: np.ndarray,
    labels: np.ndarray,
    score_maps: np.ndarray,
    masks: np.ndarray,
    defect_types: list[str],
    max_fpr: float = 0.3,
    progress: bool = False,
) -> dict[str, Any]:
    """{"overall": MetricSet, "per_type": {type: MetricSet}}.

    Each per-type set holds the good images plus the images of that defect type.
    Anomalous images with an empty mask count for image metrics; their pixels are negatives.
    """
    scores, labels = _check_labels(image_scores, labels)
    maps = _check_maps(score_maps, masks)
    types = np.asarray(defect_types, dtype=object)
    _check_types(types, labels)
    _check_max_fpr(max_fpr)

    # Ranking the pixels is the expensive part: do it once and filter it per subset.
    pixels = _rank_pixels(maps, np.asarray(masks) > 0)
    subsets = {"overall": np.ones(len(scores), bool)}
    for name in sorted(set(types[labels])):
        subsets[name] = (types == name) | ~labels
    results = {
        name: _metric_set(scores, labels, pixels, members, max_fpr)
        for name, members in tqdm(subsets.items(), desc="metrics", unit="set", leave=False, disable=not progress)
    }
    overall = results.pop("overall")
    return {"overall": overall, "per_type": results}


@dataclass
class _RankedPixels:
    """All pixels of a stack of maps, ranked by descending score."""

    scores: np.ndarray  # descending
    positive: np.ndarray  # bool, inside a ground-truth region
    image: np.ndarray  # int32, index of the pixel's image
    inverse_region_size: np.ndarray  # float64, 1 / size of the pixel's region, 0 outside
    region_image: np.ndarray  # int32, the image of each ground-truth region


def _metric_set(
    scores: np.ndarray,
    labels: np.ndarray,
    pixels: _RankedPixels,
    members: np.ndarray,
    max_fpr: float,
) -> MetricSet:
    set_scores, set_labels = scores[members], labels[members]
    _, tps, fps = _ranked_counts(set_scores, set_labels)
    pixel_auroc, pixel_aupr, aupro = _pixel_metrics(pixels, members, max_fpr)
    return MetricSet(
        image_auroc=_roc_auc(tps, fps),
        pixel_auroc=pixel_auroc,
        pixel_aupr=pixel_aupr,
        aupro=aupro,
        f1_max=f1_max_threshold(set_scores, set_labels)[1] if set_labels.any() else None,
        n_images=int(members.sum()),
        n_anomalous=int(set_labels.sum()),
    )


def _pixel_metrics(
    pixels: _RankedPixels, members: np.ndarray, max_fpr: float
) -> tuple[float | None, float | None, float | None]:
    """(pixel AUROC, pixel AP, AUPRO) over the pixels of the member images."""
    keep = None if members.all() else members[pixels.image]
    scores, positive, inverse_size = (
        values if keep is None else values[keep]
        for values in (pixels.scores, pixels.positive, pixels.inverse_region_size)
    )
    ends = _run_ends(scores)
    tps, fps = _counts(ends, positive)
    # PRO(t) is the mean over regions of each region's covered fraction: a running sum over
    # ranked pixels where each region pixel weighs 1 / (regions * its region's size).
    n_regions = int(members[pixels.region_image].sum())
    aupro = None
    if n_regions and fps[-1]:
        overlap = np.cumsum(inverse_size, dtype=np.float64)[ends] / n_regions
        aupro = _area_to_fpr(fps / fps[-1], overlap, max_fpr)
    return _roc_auc(tps, fps), _average_precision(tps, fps), aupro


def _area_to_fpr(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Area under pro(fpr) from 0 to max_fpr, divided by max_fpr."""
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    # Cut at max_fpr, interpolating on the segment that crosses it. Runs of positives
    # only repeat an fpr value, so the segment starts at the last point at or below.
    end = int(np.searchsorted(fpr, max_fpr, side="right"))
    pro_at_cut = pro[end - 1]
    if end < fpr.size:
        slope = (pro[end] - pro[end - 1]) / (fpr[end] - fpr[end - 1])
        pro_at_cut += slope * (max_fpr - fpr[end - 1])
    cut_fpr = np.append(fpr[:end], max_fpr)
    cut_pro = np.append(pro[:end], pro_at_cut)
    return float(np.trapezoid(cut_pro, cut_fpr) / max_fpr)


def _rank_pixels(maps: np.ndarray, masks: np.ndarray) -> _RankedPixels:
    inverse_region_size = np.zeros(maps.shape, np.float64)
    region_image = []
    for i, mask in enumerate(masks):
        count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        inverse = 1.0 / np.bincount(components.reshape(-1), minlength=count)
        inverse[0] = 0.0  # the background is no region
        inverse_region_size[i] = inverse[components]
        region_image.append(np.full(count - 1, i, np.int32))
    order = _descending_order(maps.reshape(-1))
    return _RankedPixels(
        scores=maps.reshape(-1)[order],
        positive=masks.reshape(-1)[order],
        image=(order // (maps.shape[1] * maps.shape[2])).astype(np.int32),
        inverse_region_size=inverse_region_size.reshape(-1)[order],
        region_image=np.concatenate(region_image),
    )


def _check_maps(score_maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    maps = np.asarray(score_maps)
    if maps.ndim != 3 or maps.shape != np.shape(masks):
        raise ValueError(
            "score_maps and masks must be (N, H, W) of one shape, "
            f"got {maps.shape} and {np.shape(masks)}"
        )
    if maps.size == 0:
        raise ValueError(f"score_maps are empty: {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("score_maps hold NaN or infinite values")
    return np.ascontiguousarray(maps)


def _check_types(types: np.ndarray, labels: np.ndarray) -> None:
    if types.shape != labels.shape:
        raise ValueError(f"defect_types has {types.size} entries for {labels.size} images")
    mismatch = np.flatnonzero((types == GOOD) != ~labels)
    if mismatch.size:
        i = int(mismatch[0])
        raise ValueError(
            f"image {i}: defect type {types[i]!r} disagrees with label {int(labels[i])} "
            f"(label 0 must go with {GOOD!r} and only with it)"
        )


def _check_max_fpr(max_fpr: float) -> None:
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
