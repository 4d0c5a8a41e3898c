"""SPADE and PatchCore: heads against brute force, calibrate/evaluate commands, runtime parity, tiling."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.data import read_image, test_samples as list_test_samples
from engines.bundle import load_bundle
from conftest import pipeline
from engines.methods.patchcore import PatchcoreSettings
from engines.methods.patchcore.method import PatchCoreHead
from engines.methods.spade import SpadeSettings
from engines.methods.spade.method import SpadeHead

REPO = Path(__file__).resolve().parents[1]
# The heads run in torch on both sides; only the engine differs. ONNX Runtime's fused float32
# ops move features by ~1e-6 relative, and a kNN distance carries that through unamplified,
# except near zero distance (see engines/knn.py), hence the map's absolute term.
PARITY_RTOL = 1e-3
METHODS = ("patchcore", "spade")


def _brute(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return torch.cdist(queries.double(), bank.double())


def test_patchcore_head_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 6, generator=gen)
    feats = torch.randn(2, 6, 4, 5, generator=gen) * 1.5
    head = PatchCoreHead(PatchcoreSettings(neighbours=3, support=4), bank)
    amap, score = head([feats])
    q = feats.permute(0, 2, 3, 1).reshape(2, 20, 6)
    d = _brute(q.reshape(-1, 6), bank)
    ref_map = d.topk(3, dim=1, largest=False).values.mean(1).reshape(2, 4, 5)
    torch.testing.assert_close(amap.double(), ref_map, rtol=1e-4, atol=1e-4)
    for b in range(2):  # the paper's reweighting, written out directly
        worst = int(ref_map[b].flatten().argmax())
        qd = _brute(q[b, worst:worst + 1], bank)[0]
        nearest = int(qd.argmin())
        support = _brute(bank[nearest:nearest + 1], bank)[0].topk(4, largest=False).indices
        weight = 1 - torch.softmax(qd[support], 0)[0]
        assert int(support[0]) == nearest
        assert float(score[b]) == pytest.approx(float(weight * ref_map[b].max()), rel=1e-4)


def test_patchcore_reweighting_discounts_dense_regions() -> None:
    # The same distance to the nearest bank patch counts more next to an isolated bank patch.
    dense = torch.zeros(20, 2)
    dense[1:, 0] = torch.linspace(0.05, 1.0, 19)
    isolated = torch.tensor([[50.0, 0.0]])
    head = PatchCoreHead(PatchcoreSettings(neighbours=1, support=5), torch.cat([dense, isolated]))
    near_dense = torch.tensor([-1.0, 0.0]).view(1, 2, 1, 1)
    near_isolated = torch.tensor([51.0, 0.0]).view(1, 2, 1, 1)
    _, s_dense = head([near_dense])
    _, s_isolated = head([near_isolated])
    # Both are 1.0 from their nearest bank patch; the isolated one keeps (nearly) all of it.
    assert 0 < float(s_dense) < 0.9 and float(s_isolated) == pytest.approx(1.0, abs=1e-6)


def test_patchcore_map_max_leaves_the_image_score_to_the_map() -> None:
    gen = torch.Generator().manual_seed(3)
    bank, feats = torch.randn(50, 8, generator=gen), torch.randn(2, 8, 4, 5, generator=gen)
    reweighted = PatchCoreHead(PatchcoreSettings(neighbours=1), bank)([feats])
    map_only = PatchCoreHead(PatchcoreSettings(neighbours=1, image_score="map_max"), bank)([feats])
    assert isinstance(reweighted, tuple) and not isinstance(map_only, tuple)
    torch.testing.assert_close(map_only, reweighted[0])
    with pytest.raises(ValueError, match="image_score"):
        PatchcoreSettings(image_score="mean")


def test_spade_head_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    n, p, d = 12, 20, 5
    gallery = torch.randn(n, p, d, generator=gen)
    pooled = gallery.mean(1) + 0.1 * torch.randn(n, d, generator=gen)
    feats = torch.randn(2, d, 4, 5, generator=gen)
    head = SpadeHead(SpadeSettings(neighbours=2, image_neighbours=3), {"pooled": pooled, "gallery": gallery})
    amap, score = head([feats])
    qp = feats.mean((2, 3))
    dimg = _brute(qp, pooled)
    torch.testing.assert_close(score.double(), dimg.topk(3, dim=1, largest=False).values.mean(1),
                               rtol=1e-4, atol=1e-4)
    for b in range(2):
        near = dimg[b].topk(3, largest=False).indices
        q = feats[b].flatten(1).T
        ref = _brute(q, gallery[near].reshape(-1, d)).topk(2, dim=1, largest=False).values.mean(1)
        torch.testing.assert_close(amap[b].flatten().double(), ref, rtol=1e-4, atol=1e-4)


def test_heads_refuse_bad_neighbour_counts() -> None:
    with pytest.raises(ValueError, match="patchcore neighbours=5"):
        PatchCoreHead(PatchcoreSettings(neighbours=5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="spade image_neighbours=4"):
        SpadeHead(SpadeSettings(image_neighbours=4), {"pooled": torch.zeros(3, 2), "gallery": torch.zeros(3, 4, 2)})


@pytest.fixture(scope="module", params=METHODS)
def knn_bundle(request, sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Each method calibrated through the CLI, with a threshold set from synthetic defects."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = tmp / "c.yaml"
    method = {"patchcore": "{kind: patchcore, coreset_ratio: 0.1, neighbours: 1}",
              "spade": "{kind: spade, neighbours: 1, image_neighbours: 3}"}[request.param]
    cfg.write_text(f"model:\n  input_size: [128, 128]\n  synthetic_defects: 6\n  threshold: {{policy: f1}}\n"
                   f"  method: {method}\n")
    out = tmp / "bundle"
    r = subprocess.run([sys.executable, "-m", "agent", "calibrate", "--data", str(sample_data), "--out", str(out),
                        "--config", str(cfg)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_id"].startswith(request.param + "-")
    return load_bundle(out)


def test_bundle_holds_the_method_and_its_threshold(knn_bundle) -> None:
    m = knn_bundle.manifest
    assert set(m.files) == {"network.safetensors", "head.safetensors", "model.onnx"}
    assert m.decision.policy == "f1" and m.decision.miss_rate is not None
    assert m.score_stats["synthetic_defects"]["n"] == 6
    if m.method == "patchcore":
        fit = m.score_stats["fit"]
        assert fit["coreset"] == round(0.1 * fit["patches"]) and knn_bundle.head_tensors()["bank"].shape[0] == fit["coreset"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpu_runtimes_match_torch_reference(knn_bundle, sample_data: Path, backend: str) -> None:
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    r, o = pipeline(knn_bundle, "torch").score(images), pipeline(knn_bundle, backend).score(images)
    ref_scores = np.array([f.score for f in r])
    np.testing.assert_allclose([f.score for f in o], ref_scores, rtol=PARITY_RTOL)
    scale = max(float(f.map.max()) for f in r)
    for a, b in zip(r, o):
        np.testing.assert_allclose(b.map, a.map, rtol=PARITY_RTOL, atol=PARITY_RTOL * scale)


def test_evaluate_separates_defects(knn_bundle, sample_data: Path) -> None:
    from calibration.evaluate import evaluate

    overall = evaluate(knn_bundle, pipeline(knn_bundle, "onnxruntime"), sample_data,
                       progress=False).metrics["overall"].to_dict()
    assert overall["pixel_auroc"] > 0.9
    # SPADE's image score pools the whole image, which dilutes the sample data's small defects.
    assert overall["image_auroc"] > (0.9 if knn_bundle.manifest.method == "patchcore" else 0.6)


def test_tiled_patchcore_scores_the_worst_tile(tmp_path: Path) -> None:
    from calibration.calibrate import calibrate
    from calibration.synthetic import write_dataset
    from conftest import small_model_config
    from engines.tiling import TilingConfig, make_grid, tiles_of

    data = write_dataset(tmp_path / "part", n_train=6, n_test_good=1, n_test_defect=1, size=(96, 128), seed=2)
    cfg = small_model_config("patchcore", input_size=[64, 64], tiling=TilingConfig(enabled=True, overlap=0.25))
    bundle = calibrate(data, tmp_path / "tiled", cfg, progress=False)
    scorer = pipeline(bundle)
    image = read_image(list_test_samples(data)[-1].path)
    frame = scorer.score_frame(image)
    assert frame.map.shape == image.shape[:2]
    tiles = tiles_of(image, make_grid(image.shape[:2], (64, 64), cfg.tiling), 1.0)
    assert len(tiles) > 1
    # The frame's score is the largest of its tiles' own image scores.
    tile_scores = [scorer.backend.run(torch.from_numpy(np.stack([t])))[1] for t in tiles]
    assert frame.score == pytest.approx(max(float(s) for s in tile_scores), rel=1e-5)
