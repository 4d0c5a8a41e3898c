"""The reconstruction GAN (gan): synthetic defects, training reproducible from the seed, the
coarse whole-frame pass, torch-vs-ONNX-Runtime-vs-OpenVINO parity of the score graph, the agent."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator

from agent.frames import Frame
from agent.inspector import Inspector
from calibration.calibrate import calibrate, split_train, validation_set
from calibration.data import read_image, test_samples as list_test_samples, train_samples
from calibration.images import TrainImages
from conftest import assert_runtime_parity, pipeline, small_model_config
from engines.bundle import Bundle
from engines.graph import build_engine
from engines.methods import FitContext, implementation
from engines.methods.gan.corruption import corrupt, defect_mask
from engines.model import ModelSpec
from engines.pipeline import Pipeline, model_inputs
from engines.tiling import TilingConfig, make_grid
from engines.validation import prepare_validation

SIZE = [64, 64]
PARITY_RTOL = 2e-3  # SSIM and feature distances are differences of nearly equal values
SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "agent" / "verdict.schema.json").read_text())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tiled: bool = False, seed: int = 0, coarse_weight: float = 0.5):
    settings = {"kind": "gan", "epochs": 2, "batch_size": 8, "latent_dim": 16, "width": 4, "crop": 32,
                "patience": 2, "epoch_inputs": 16, "coarse_weight": coarse_weight}
    cfg = small_model_config(settings, input_size=list(SIZE), seed=seed)
    cfg.tiling = TilingConfig(enabled=tiled, overlap=0.25)
    return cfg


@pytest.fixture(scope="module")
def bundles(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("gan")
    return {name: calibrate(sample_data, root / name, tiny_config(tiled), progress=False)
            for name, tiled in (("resized", False), ("tiled", True))}


# --- synthetic defects ---------------------------------------------------------------------------

def test_defect_masks_range_from_cracks_to_blobs() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = [defect_mask(64, 64, gen) for _ in range(200)]
    areas = np.array([float(m.mean()) for m in masks])
    assert areas.max() > 0.02 and np.median(areas) < 0.02  # some blobs, mostly small
    assert all(set(torch.unique(m).tolist()) <= {0.0, 1.0} for m in masks)


def test_corruption_is_seeded_and_touches_about_its_share() -> None:
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = corrupt(x, torch.Generator().manual_seed(2), 0.5)
    b = corrupt(x, torch.Generator().manual_seed(2), 0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.2 < changed < 0.8
    assert torch.equal(corrupt(x, torch.Generator().manual_seed(2), 0.0), x)


# --- training ------------------------------------------------------------------------------------

def test_training_is_reproducible_from_the_seed(sample_data: Path) -> None:
    paths = [s.path for s in train_samples(sample_data)]
    fit, held = split_train(paths, 0.2, 0)
    images = [TrainImages(p, tuple(SIZE), TilingConfig(), 8, progress=False) for p in (fit, held)]
    spec = tiny_config().spec()
    runs = [implementation("gan").fit(spec, FitContext(*images, seed=s, progress=False)) for s in (0, 0, 1)]
    same, other = runs[0].network_state, runs[2].network_state
    for k, v in same.items():
        torch.testing.assert_close(runs[1].network_state[k], v, rtol=0, atol=0)
    assert any(not torch.equal(other[k], v) for k, v in same.items()), "the seed has no effect"
    assert runs[0].head_tensors.keys() == {"ssim_mean", "ssim_std", "feature_mean", "feature_std"}
    assert runs[0].info["epochs_run"] >= 1


def test_detection_stopping_keeps_the_epoch_that_finds_synthetic_defects_best(sample_data: Path) -> None:
    paths = [s.path for s in train_samples(sample_data)]
    fit, held = split_train(paths, 0.2, 0)
    images = [TrainImages(p, tuple(SIZE), TilingConfig(), 8, progress=False) for p in (fit, held)]
    settings = {"kind": "gan", "epochs": 4, "batch_size": 8, "latent_dim": 16, "width": 4, "crop": 32,
                "patience": 4, "epoch_inputs": 16, "stop_on": "detection"}
    spec = small_model_config(settings, input_size=list(SIZE)).spec()
    validation = validation_set([read_image(p) for p in held], 6, spec, 0)
    fitted = implementation("gan").fit(spec, FitContext(*images, progress=False, validation=validation))
    vals = [h["val"] for h in fitted.info["history"]]
    assert fitted.info["best_val"] == min(vals) and vals[fitted.info["best_epoch"] - 1] == min(vals)
    # The kept weights, under the head's statistics (from the same held-out good images), score the
    # validation set exactly as the criterion did: the criterion is the detection of its defects.
    engine = build_engine(spec)
    engine.load_state_dict(fitted.network_state)
    head = implementation("gan").head(spec, fitted.head_tensors)
    with torch.no_grad():
        maps = torch.cat([head(engine(x)) for x in validation.images.split(8)])
    prepared = prepare_validation(validation, lambda x: x, 8, torch.device("cpu"))
    assert prepared.error_of(maps) == pytest.approx(fitted.info["best_val"], abs=1e-4)
    assert 0.0 <= fitted.info["best_val"] <= 1.0


def test_detection_stopping_refuses_without_synthetic_defects(sample_data: Path) -> None:
    paths = [s.path for s in train_samples(sample_data)]
    images = [TrainImages(p, tuple(SIZE), TilingConfig(), 8, progress=False) for p in split_train(paths, 0.2, 0)]
    spec = small_model_config({"kind": "gan", "stop_on": "detection"}, input_size=list(SIZE)).spec()
    with pytest.raises(ValueError, match="validation_defects"):
        implementation("gan").fit(spec, FitContext(*images, progress=False))


# --- the coarse whole-frame pass -----------------------------------------------------------------

def test_coarse_weight_belongs_to_tiled_gan_models_only() -> None:
    assert ModelSpec(method={"kind": "gan", "coarse_weight": 0.4}).coarse_weight == 0.0  # resized: no tiles
    assert ModelSpec(method={"kind": "gan", "coarse_weight": 0.4}, tiling={"enabled": True}).coarse_weight == 0.4
    assert ModelSpec(method="padim", tiling={"enabled": True}).coarse_weight == 0.0


def test_model_inputs_add_the_whole_frame_after_the_tiles() -> None:
    image = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    tiling = TilingConfig(enabled=True, overlap=0.25)
    tiles = model_inputs(image, (64, 64), tiling)
    with_coarse = model_inputs(image, (64, 64), tiling, coarse=True)
    assert len(tiles) == len(make_grid((100, 200), (64, 64), tiling)) and len(with_coarse) == len(tiles) + 1
    assert with_coarse[-1].shape == (64, 64, 3)


def test_coarse_pass_blends_the_whole_frame_into_the_tiled_map(bundles: dict, sample_data: Path) -> None:
    bundle = bundles["tiled"]
    w = bundle.manifest.model.coarse_weight
    assert w == 0.5
    tiles_only = bundle.manifest.model_copy(deep=True)
    tiles_only.model.method.coarse_weight = 0.0
    with_coarse = pipeline(bundle)
    without = Pipeline(Bundle(bundle.path, tiles_only), with_coarse.backend)
    image = read_image(list_test_samples(sample_data)[-1].path)
    blended, tiled = with_coarse.score_frame(image), without.score_frame(image)
    resized = model_inputs(image, tuple(SIZE), TilingConfig())[0]
    coarse_map = with_coarse.backend.run(torch.from_numpy(resized[None]))[0][0]
    coarse_up = torch.nn.functional.interpolate(coarse_map[None, None], size=tiled.map.shape, mode="bilinear",
                                                align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(blended.map, (1 - w) * tiled.map + w * coarse_up, rtol=1e-5, atol=1e-5)
    assert np.abs(blended.map - tiled.map).max() > 0.05 * tiled.map.max()  # the coarse pass changes the map
    assert blended.score != pytest.approx(tiled.score, rel=1e-3)            # ... and the image score


# --- bundles: parity and the agent --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name", ["resized", "tiled"])
def test_cpu_runtimes_match_torch_reference(bundles: dict, sample_data: Path, name: str, backend: str) -> None:
    bundle = bundles[name]
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    assert_runtime_parity(bundle, images, backend, PARITY_RTOL, threads=1)


def test_runs_in_the_agent(bundles: dict, sample_data: Path) -> None:
    bundle = bundles["tiled"]
    inspector = Inspector(bundle, pipeline(bundle, "onnxruntime", threads=1))
    validator = Draft202012Validator(SCHEMA)
    for i, s in enumerate(list_test_samples(sample_data)[:4]):
        result = inspector.inspect(Frame(id=f"f{i}", seq=i, source="test", image=read_image(s.path)))
        payload = json.loads(result.verdict.to_json())
        validator.validate(payload)
        assert payload["status"] in ("ok", "ng"), payload["error"]
        assert np.isfinite(payload["image_score"]) and result.score_map is not None
        assert (payload["status"] == "ng") == (payload["normalized_score"] >= 1.0) == bool(payload["regions"])
