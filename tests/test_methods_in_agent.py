"""Every method, tiled and untiled, through the agent's inspector: one schema-valid verdict per frame."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from agent.frames import Frame
from agent.inspector import Inspector
from calibration.calibrate import calibrate
from calibration.data import read_image, test_samples as list_test_samples
from conftest import pipeline, small_model_config
from engines.tiling import TilingConfig

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "agent" / "verdict.schema.json").read_text())
METHODS = ["padim", "spade", "patchcore", "ae-l2", "ae-l2-features", "ae-ssim", "gan", "algan"]
_TRAINED = {"epochs": 1, "batch_size": 8, "latent_dim": 16, "patience": 1}
QUICK = {"padim": {"dims": 32}, "patchcore": {"coreset_ratio": 0.1}, "spade": {"image_neighbours": 3},
         **{m: _TRAINED for m in ("ae-l2", "ae-ssim", "gan", "algan")},
         # the per-position coder: fitted in closed form, so no training keys
         "ae-l2-features": {"kind": "ae-l2", "on_features": True, "latent_dim": 16}}


@pytest.mark.parametrize("tiled", [False, True], ids=["resized", "tiled"])
@pytest.mark.parametrize("method", METHODS)
def test_method_gives_one_valid_verdict_per_frame(method: str, tiled: bool, sample_data: Path, tmp_path: Path) -> None:
    settings = {"kind": method, **QUICK.get(method, {})}
    cfg = small_model_config(settings, input_size=[64, 64])
    cfg.tiling = TilingConfig(enabled=tiled, overlap=0.25)
    bundle = calibrate(sample_data, tmp_path / "bundle", cfg, progress=False)
    inspector = Inspector(bundle, pipeline(bundle, "onnxruntime", threads=1))
    samples = list_test_samples(sample_data)[:3]
    validator = Draft202012Validator(SCHEMA)
    for i, s in enumerate(samples):
        image = read_image(s.path)
        result = inspector.inspect(Frame(id=f"f{i}", seq=i, source="test", image=image))
        payload = json.loads(result.verdict.to_json())
        validator.validate(payload)
        assert payload["status"] in ("ok", "ng"), payload["error"]
        assert np.isfinite(payload["image_score"]) and result.score_map is not None
        assert {"prepare", "score"} <= set(payload["timings_ms"])
        assert (payload["status"] == "ng") == (payload["normalized_score"] >= 1.0) == bool(payload["regions"])


@pytest.mark.parametrize("method", ["spade", "patchcore"])
def test_a_method_with_its_own_image_score_has_regions_whenever_ng(method: str, sample_data: Path,
                                                                   tmp_path: Path) -> None:
    # A threshold just above the median good score makes many frames NG: each must point somewhere.
    cfg = small_model_config({"kind": method, **QUICK[method]}, input_size=[64, 64])
    cfg.threshold.quantile = 0.55
    bundle = calibrate(sample_data, tmp_path / "bundle", cfg, progress=False)
    inspector = Inspector(bundle, pipeline(bundle, "onnxruntime", threads=1))
    verdicts = [inspector.inspect(Frame(id=f"f{i}", seq=i, source="test", image=read_image(s.path))).verdict
                for i, s in enumerate(list_test_samples(sample_data))]
    ng = [v for v in verdicts if v.status == "ng"]
    assert len(ng) >= 3
    assert all(v.regions for v in ng)
