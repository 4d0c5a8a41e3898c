"""Every method, tiled and untiled, through the agent's inspector: one schema-valid verdict per frame."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from agent.frames import Frame
from agent.inspector import Inspector
from engines.tiling import TilingConfig
from calibration.calibrate import calibrate
from calibration.data import read_image, test_samples as list_test_samples
from engines.runtimes.onnxruntime_backend import OrtBackend, OrtBackendConfig
from engines.scorer import Scorer

from conftest import small_model_config

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "agent" / "verdict.schema.json").read_text())
METHODS = ["padim", "spade", "patchcore", "ae-l2", "ae-ssim", "gan", "algan"]


@pytest.mark.parametrize("tiled", [False, True], ids=["resized", "tiled"])
@pytest.mark.parametrize("method", METHODS)
def test_method_gives_one_valid_verdict_per_frame(method: str, tiled: bool, sample_data: Path, tmp_path: Path) -> None:
    cfg = small_model_config(method, input_size=[64, 64])
    cfg.train = cfg.train.model_copy(update=dict(epochs=1, batch_size=8, latent_dim=16, patience=1))
    cfg.knn = cfg.knn.model_copy(update=dict(coreset_ratio=0.1, image_neighbours=3))
    cfg.tiling = TilingConfig(enabled=tiled, overlap=0.25)
    bundle = calibrate(sample_data, tmp_path / "bundle", cfg, progress=False)
    inspector = Inspector(bundle, Scorer(bundle, OrtBackend(bundle, OrtBackendConfig(threads=1))))
    samples = list_test_samples(sample_data)[:3]
    validator = Draft202012Validator(SCHEMA)
    for i, s in enumerate(samples):
        image = read_image(s.path)
        result = inspector.inspect(Frame(id=f"f{i}", seq=i, source="test", image=image))
        payload = json.loads(result.verdict.to_json())
        validator.validate(payload)
        assert payload["status"] in ("ok", "ng"), payload["error"]
        assert np.isfinite(payload["image_score"]) and result.heatmap is not None
        assert {"network", "head"} <= set(payload["timings_ms"])
