"""Tiling: grids cover the frame, stitching is exact, tiled models (shared and per tile position) score alike in every runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import torch

from calibration.calibrate import calibrate
from calibration.data import read_image, test_samples as list_test_samples
from conftest import pipeline, small_model_config
from engines.tiling import Stitcher, TilingConfig, make_grid, tiles_of


@pytest.mark.parametrize("frame, overlap, scale", [((500, 1250), 0.25, 1.0), ((500, 1250), 0.25, 0.5),
                                                   ((100, 90), 0.0, 1.0), ((256, 256), 0.5, 1.0)])
def test_grid_covers_the_frame_with_the_requested_overlap(frame, overlap, scale) -> None:
    grid = make_grid(frame, (256, 256), TilingConfig(enabled=True, overlap=overlap, scale=scale))
    covered = np.zeros((grid.height, grid.width), bool)
    for y, x in grid.origins:
        assert 0 <= y <= grid.height - 256 and 0 <= x <= grid.width - 256
        covered[y:y + 256, x:x + 256] = True
    assert covered.all()
    ys = sorted({y for y, _ in grid.origins})
    assert all(b - a <= 256 * (1 - overlap) + 1 for a, b in zip(ys, ys[1:]))


def test_stitching_a_frame_of_its_own_pixels_gives_the_frame_back() -> None:
    rng = np.random.default_rng(0)
    frame = rng.random((300, 700)).astype(np.float32)
    cfg = TilingConfig(enabled=True, overlap=0.3)
    grid = make_grid(frame.shape, (128, 128), cfg)
    stitcher = Stitcher(grid)
    for i, tile in enumerate(tiles_of(frame, grid, 1.0)):
        stitcher.add(i, torch.from_numpy(np.ascontiguousarray(tile)))
    np.testing.assert_allclose(stitcher.result(frame.shape, 1.0).numpy(), frame, rtol=1e-6)


@pytest.fixture(scope="module", params=["shared", "per_position"])
def tiled_bundle(request, sample_data: Path, tmp_path_factory):
    cfg = small_model_config(input_size=[64, 64])
    cfg.tiling = TilingConfig(enabled=True, overlap=0.25, stats=request.param)
    return calibrate(sample_data, tmp_path_factory.mktemp("tiled") / request.param, cfg, progress=False)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_tiled_model_scores_alike_in_torch_and_cpu_runtimes(tiled_bundle, sample_data: Path, backend: str) -> None:
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    # Different batch sizes: tiles of one frame split and shared across engine calls differently.
    r = pipeline(tiled_bundle, "torch", batch_size=4).score(images)
    o = pipeline(tiled_bundle, backend, batch_size=5).score(images)
    for a, b in zip(r, o):
        assert a.map.shape == images[0].shape[:2]
        np.testing.assert_allclose(b.score, a.score, rtol=1e-3)
        np.testing.assert_allclose(b.map, a.map, rtol=1e-3, atol=1e-3 * a.score)
    labels = np.array([s.label for s in list_test_samples(sample_data)])
    scores = np.array([f.score for f in r])
    assert scores[labels == 1].mean() > np.median(scores[labels == 0])


@pytest.mark.parametrize("tiled_bundle", ["per_position"], indirect=True)
def test_per_position_model_refuses_another_frame_size(tiled_bundle) -> None:
    with pytest.raises(ValueError, match="calibrated on"):
        pipeline(tiled_bundle).score_frame(np.zeros((400, 400, 3), np.uint8))
