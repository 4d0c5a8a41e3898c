"""Metrics against hand-computed cases and against scikit-learn / a naive AUPRO."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as sk

from calibration.metrics import (
    MetricSet,
    average_precision,
    compute_metrics,
    f1_max_threshold,
    precision_recall_curve,
    pro_auc,
    roc_auc,
    roc_curve,
)


# --- image-level curves -----------------------------------------------------------------

def test_roc_auc_hand_cases() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # Pairs (positive, negative): 2>1, 2=2 (half), 3>1, 3>2 -> 3.5 / 4.
    assert roc_auc(np.array([1, 2, 2, 3]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)


def test_average_precision_hand_cases() -> None:
    # 0.8 (P) precision 1 at recall 1/2; 0.35 (P) precision 2/3 at recall 1.
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # A tie admits both items at once: precision 1/2 at recall 1/2, then 2/3 at recall 1.
    scores, labels = np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])
    assert average_precision(scores, labels) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_undefined_metrics_are_none() -> None:
    scores = np.array([0.1, 0.2, 0.3])
    assert roc_auc(scores, np.zeros(3, int)) is None
    assert roc_auc(scores, np.ones(3, int)) is None
    assert average_precision(scores, np.zeros(3, int)) is None
    with pytest.raises(ValueError, match="positive"):
        f1_max_threshold(scores, np.zeros(3, int))


@pytest.mark.parametrize("seed", range(5))
def test_curves_match_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.3).astype(int)
    # Rounding to one decimal makes many ties across both classes.
    scores = np.round(rng.normal(size=300) + labels, 1)

    assert roc_auc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        sk.average_precision_score(labels, scores), abs=1e-12
    )
    fpr, tpr, thresholds = roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    precision, recall, pr_thresholds = precision_recall_curve(scores, labels)
    sk_precision, sk_recall, sk_pr_thresholds = sk.precision_recall_curve(labels, scores)
    # scikit-learn orders by rising threshold and appends the point (recall 0, precision 1).
    np.testing.assert_allclose(precision[::-1], sk_precision[:-1])
    np.testing.assert_allclose(recall[::-1], sk_recall[:-1])
    np.testing.assert_allclose(pr_thresholds[::-1], sk_pr_thresholds)


def test_f1_max_threshold_hand_case() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    labels = np.array([0, 1, 0, 1, 1])
    # F1 = 2tp / (tp + fp + P) at t = .5 .4 .3 .2 .1: 2/4, 4/5, 4/6, 6/7, 6/8.
    threshold, f1 = f1_max_threshold(scores, labels)
    assert threshold == pytest.approx(0.2)
    assert f1 == pytest.approx(6 / 7)


def test_f1_max_threshold_counts_ties_as_one_threshold() -> None:
    # Below 0.5 nothing changes; at 0.5 the tie admits one good and one defect together.
    threshold, f1 = f1_max_threshold(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 0]))
    assert threshold == pytest.approx(0.5)
    assert f1 == pytest.approx(2 / 3)


# --- AUPRO ------------------------------------------------------------------------------

def _two_region_example() -> tuple[np.ndarray, np.ndarray]:
    """Region A (top left, 2 px), region B (bottom right, 2 px), 8 normal pixels."""
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], bool)
    scores = np.array(
        [[0.9, 0.5, 0.8, 0.6],
         [0.4, 0.3, 0.15, 0.1],
         [0.05, 0.01, 0.7, 0.2]],
        np.float32,
    )
    return scores[None], mask[None]


def test_aupro_hand_computed() -> None:
    maps, masks = _two_region_example()
    # Descending: .9 A, .8 N, .7 B, .6 N, .5 A, .4 N, .3 N, .2 B, ...
    # (fpr, pro): (0, .25) (1/8, .25) (1/8, .5) (2/8, .5) (2/8, .75) (3/8, .75) (4/8, .75) (4/8, 1)
    # To 0.3: .25 * 1/8 + .5 * 1/8 + .75 * .05 = 0.13125, normalised by 0.3.
    assert pro_auc(maps, masks, max_fpr=0.3) == pytest.approx(0.13125 / 0.3)
    # To 1: .25/8 + .5/8 + .75 * 2/8 + 1 * 1/2.
    assert pro_auc(maps, masks, max_fpr=1.0) == pytest.approx(0.78125)


def test_aupro_interpolates_a_rising_segment_at_the_cut() -> None:
    maps, masks = _two_region_example()
    maps[0, 0, 3] = 0.5  # a normal pixel ties with A's second pixel
    # (1/8, .5) -> (2/8, .75) is one diagonal step; at 0.2 it reads .5 + .25 * .6 = .65.
    expected = (0.25 * 0.125 + (0.5 + 0.65) / 2 * 0.075) / 0.2
    assert pro_auc(maps, masks, max_fpr=0.2) == pytest.approx(expected)


def test_aupro_regions_are_eight_connected() -> None:
    # (0,0) touches (1,1) only diagonally: one region of 3 pixels, so covering (0,0) alone
    # gives overlap 1/3 (with 4-connectivity it would be two regions and overlap 1/2).
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    scores = np.array([[0.9, 0.7, 0.6], [0.5, 0.05, 0.05], [0.4, 0.3, 0.2]], np.float32)
    assert pro_auc(scores[None], mask[None], max_fpr=1.0) == pytest.approx(1 / 3)


def _naive_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """One full pass per threshold, regions from scipy.ndimage: slow but plainly right."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    area, x0, y0 = 0.0, 0.0, 0.0
    for x1, y1 in zip(fpr[1:], pro[1:]):
        if x1 > max_fpr:
            y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            return (area + (y0 + y_cut) / 2 * (max_fpr - x0)) / max_fpr
        area += (y0 + y1) / 2 * (x1 - x0)
        x0, y0 = x1, y1
    return area / max_fpr


@pytest.mark.parametrize("decimals", [None, 1])
def test_aupro_matches_naive_reference(decimals: int | None) -> None:
    rng = np.random.default_rng(7)
    maps = rng.normal(size=(4, 24, 24)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[1, 2:6, 3:9] = True
    masks[1, 6:9, 9:12] = True  # touches the first block diagonally only
    masks[2, 10:20, 10:14] = True
    masks[3, 0:2, 0:2] = True
    masks[3, 20:23, 15:23] = True
    maps[masks] += 1.0
    if decimals is not None:
        maps = np.round(maps, decimals)  # ties between normal and region pixels
    for max_fpr in (0.05, 0.3, 1.0):
        assert pro_auc(maps, masks, max_fpr) == pytest.approx(
            _naive_aupro(maps, masks, max_fpr), abs=1e-9
        )


def test_aupro_undefined_without_regions() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    assert pro_auc(maps, np.zeros(maps.shape, bool)) is None


# --- compute_metrics --------------------------------------------------------------------

def _dataset(dtype: type = np.float32) -> dict:
    """8 good, 4 'scratch' and 3 'dent' images, one dent with an empty mask."""
    rng = np.random.default_rng(3)
    types = ["good"] * 8 + ["scratch"] * 4 + ["dent"] * 3
    labels = np.array([0 if t == "good" else 1 for t in types])
    maps = rng.normal(size=(len(types), 16, 16)).astype(dtype)
    masks = np.zeros(maps.shape, bool)
    for i in range(8, 14):
        y, x = rng.integers(0, 10, 2)
        masks[i, y:y + 5, x:x + rng.integers(2, 7)] = True
    maps[masks] += 1.5
    image_scores = maps.reshape(len(types), -1).max(1).astype(np.float64)
    return {"image_scores": image_scores, "labels": labels, "score_maps": maps,
            "masks": masks, "defect_types": types}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compute_metrics_matches_scikit_learn_per_set(dtype: type) -> None:
    data = _dataset(dtype)
    result = compute_metrics(**data)
    assert set(result["per_type"]) == {"scratch", "dent"}
    types = np.array(data["defect_types"])
    subsets = {
        "overall": np.ones(len(types), bool),
        "scratch": np.isin(types, ["good", "scratch"]),
        "dent": np.isin(types, ["good", "dent"]),
    }
    for name, members in subsets.items():
        m = result["overall"] if name == "overall" else result["per_type"][name]
        assert isinstance(m, MetricSet)
        labels = data["labels"][members]
        scores = data["image_scores"][members]
        pixels = data["score_maps"][members].reshape(-1)
        truth = data["masks"][members].reshape(-1)
        assert m.n_images == members.sum()
        assert m.n_anomalous == labels.sum()
        assert m.image_auroc == pytest.approx(sk.roc_auc_score(labels, scores))
        assert m.pixel_auroc == pytest.approx(sk.roc_auc_score(truth, pixels))
        assert m.pixel_aupr == pytest.approx(sk.average_precision_score(truth, pixels))
        assert m.aupro == pytest.approx(
            _naive_aupro(data["score_maps"][members], data["masks"][members], 0.3)
        )
        assert m.f1_max == pytest.approx(f1_max_threshold(scores, labels)[1])


def test_anomalous_image_with_empty_mask() -> None:
    data = _dataset()
    assert not data["masks"][14].any() and data["labels"][14] == 1
    # Give the empty-mask dent the highest pixel of all: as a negative it must cost AUROC.
    data["score_maps"][14, 0, 0] = 100.0
    data["image_scores"][14] = 100.0
    result = compute_metrics(**data)
    overall = result["overall"]
    assert overall.n_anomalous == 7
    truth = data["masks"].reshape(-1)
    assert overall.pixel_auroc == pytest.approx(
        sk.roc_auc_score(truth, data["score_maps"].reshape(-1))
    )
    assert overall.pixel_auroc < 1.0

    # A type whose only images have empty masks: image metrics yes, pixel metrics undefined.
    only_empty = {key: value[:8] for key, value in data.items() if key != "defect_types"}
    only_empty = {
        key: np.concatenate([value, data[key][14:]]) for key, value in only_empty.items()
    }
    only_empty["defect_types"] = ["good"] * 8 + ["dent"]
    alone = compute_metrics(**only_empty)["per_type"]["dent"]
    assert alone.image_auroc == pytest.approx(1.0)
    assert alone.pixel_auroc is None and alone.pixel_aupr is None and alone.aupro is None
    assert alone.to_dict()["n_anomalous"] == 1


def test_compute_metrics_rejects_inconsistent_input() -> None:
    data = _dataset()
    bad_types = dict(data, defect_types=["good"] * 9 + ["scratch"] * 3 + ["dent"] * 3)
    with pytest.raises(ValueError, match="image 8: defect type 'good'"):
        compute_metrics(**bad_types)
    with pytest.raises(ValueError, match="score_maps and masks"):
        compute_metrics(**dict(data, masks=data["masks"][:, :10]))
    nan_maps = data["score_maps"].copy()
    nan_maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(**dict(data, score_maps=nan_maps))
