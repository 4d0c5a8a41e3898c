"""The evaluation report from small synthetic arrays: files written, images decodable."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.metrics import compute_metrics
from calibration.report import write_report

H, W = 40, 60  # not square, so a swapped axis shows up in the tile shapes


def _inputs(n_good: int, n_defect: int) -> dict:
    rng = np.random.default_rng(0)
    n = n_good + n_defect
    types = ["good"] * n_good + [("scratch", "dent")[i % 2] for i in range(n_defect)]
    labels = np.array([0] * n_good + [1] * n_defect)
    maps = rng.random((n, H, W), dtype=np.float32)
    masks = np.zeros((n, H, W), bool)
    for i in range(n_good, n):
        y, x = rng.integers(0, 30, 2)
        masks[i, y:y + 8, x:x + 12] = True
    maps[masks] += 0.5  # overlapping classes, so no metric is a trivial 1.0
    scores = maps.reshape(n, -1).max(1)
    # Grey and BGR images, both at the map size.
    images = [
        rng.integers(0, 256, (H, W), dtype=np.uint8) if i % 2 else
        rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        for i in range(n)
    ]
    return {
        "metrics": compute_metrics(scores, labels, maps, masks, types),
        "image_scores": scores,
        "labels": labels,
        "score_maps": maps,
        "masks": masks,
        "images": images,
        "names": [f"part_{i:03d}.png" for i in range(n)],
    }


def test_report_files_exist_and_decode(tmp_path: Path) -> None:
    inputs = _inputs(n_good=30, n_defect=12)
    out = tmp_path / "report"
    index = write_report(out, threshold=1.2, title="synthetic <demo>", **inputs)

    assert index == out / "index.html"
    for name in ("roc.png", "pr.png", "heatmaps.png", "metrics.json", "index.html"):
        assert (out / name).is_file(), name
    for name in ("roc.png", "pr.png"):
        plot = cv2.imread(str(out / name))
        assert plot is not None and plot.shape == (500, 500, 3)
        assert plot.std() > 0  # something was drawn
    grid = cv2.imread(str(out / "heatmaps.png"))
    assert grid is not None
    # Tiles: longer side 256, so 256 x 171 plus a 52 px caption; 24 tiles in rows of 6.
    assert grid.shape == (4 * (171 + 52), 6 * 256, 3)
    contour = np.all(grid == (0, 255, 0), axis=2)
    assert contour.sum() > 100  # the true-mask outlines

    record = json.loads((out / "metrics.json").read_text())
    assert record["threshold"] == 1.2
    assert set(record["per_type"]) == {"scratch", "dent"}
    assert record["overall"]["image_auroc"] == pytest.approx(
        inputs["metrics"]["overall"].image_auroc
    )
    assert len(record["images"]) == 42 and record["images"][0]["name"] == "part_000.png"

    page = index.read_text()
    assert "synthetic &lt;demo&gt;" in page  # escaped
    for reference in ('src="roc.png"', 'src="pr.png"', 'src="heatmaps.png"', "scratch", "dent"):
        assert reference in page
    pixel_auroc = inputs["metrics"]["overall"].pixel_auroc
    assert 0.5 < pixel_auroc < 1.0 and f"{pixel_auroc:.4f}" in page


def test_report_without_threshold_and_with_few_images(tmp_path: Path) -> None:
    inputs = _inputs(n_good=3, n_defect=2)
    index = write_report(tmp_path, threshold=None, title="small", **inputs)
    assert "No threshold given" in index.read_text()
    grid = cv2.imread(str(tmp_path / "heatmaps.png"))
    # Five distinct images: one row of six, the last tile blank.
    assert grid is not None and grid.shape == (171 + 52, 6 * 256, 3)
    assert np.all(grid[:, 5 * 256:] == 255)


def test_report_names_a_wrong_image(tmp_path: Path) -> None:
    inputs = _inputs(n_good=3, n_defect=2)
    inputs["images"][4] = np.zeros((H, W + 1), np.uint8)
    with pytest.raises(ValueError, match="part_004.png"):
        write_report(tmp_path, threshold=None, title="bad", **inputs)
