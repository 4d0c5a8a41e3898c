"""Adding a method is one file: this test file adds one (``test-mean``: distance of each pooled
pixel to the mean good image) and it calibrates, exports, runs in ONNX Runtime at parity with
torch and gives verdicts in the agent, with nothing else touched. And ``bench`` times the same
``Pipeline`` the service runs."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jsonschema import Draft202012Validator
from pydantic import Field, ValidationError
from torch import nn

from agent.frames import Frame
from agent.inspector import Inspector
from calibration.calibrate import calibrate
from calibration.data import read_image, test_samples as list_test_samples
from calibration.settings import ModelConfig
from conftest import pipeline
from engines.graph import pretrained_graph
from engines.methods import METHODS, FitContext, Fitted, MethodSettings
from engines.model import ModelSpec
from engines.pipeline import Pipeline
from engines.plugins import Plugin

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "agent" / "verdict.schema.json").read_text())


# --- the whole method: settings, network, head, fit ------------------------------------------------

class MeanSettings(MethodSettings):
    kind: Literal["test-mean"] = "test-mean"
    pool: int = Field(8, ge=1, description="pixels averaged per map cell")


class PooledImage(nn.Module):
    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.pool)


class DistanceToMean(nn.Module):
    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        return (outputs[0] - self.mean).abs().sum(1)


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    return PooledImage(spec.method.pool)


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    return DistanceToMean(tensors["mean"])


@torch.inference_mode()
def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    graph = pretrained_graph(spec, network, context.weights)
    pooled = torch.cat([graph(x)[0] for x in context.train.batches("test-mean fit")])
    return Fitted(graph.state_dict(), {"mean": pooled.mean(0)}, {"samples": len(pooled)})


PLUGIN = Plugin("test-mean", MeanSettings, lambda: sys.modules[__name__], "test only: distance to the mean image")


@pytest.fixture(scope="module")
def mean_bundle(sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    METHODS.register(PLUGIN)
    cfg = ModelConfig(method={"kind": "test-mean", "pool": 4}, input_size=[64, 64])
    yield calibrate(sample_data, tmp_path_factory.mktemp("plugin") / "bundle", cfg, progress=False)
    METHODS.unregister("test-mean")


def test_a_method_added_from_one_file_calibrates_and_runs_at_parity(mean_bundle, sample_data: Path) -> None:
    m = mean_bundle.manifest
    assert m.model.method == MeanSettings(pool=4) and m.model_id.startswith("test-mean-")
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    ref, ort = pipeline(mean_bundle, "torch").score(images), pipeline(mean_bundle, "onnxruntime").score(images)
    np.testing.assert_allclose([f.score for f in ort], [f.score for f in ref], rtol=1e-4)
    for a, b in zip(ref, ort):
        np.testing.assert_allclose(b.map, a.map, rtol=1e-4, atol=1e-4 * max(f.score for f in ref))


def test_the_added_method_gives_verdicts_in_the_agent(mean_bundle, sample_data: Path) -> None:
    inspector = Inspector(mean_bundle, pipeline(mean_bundle, "onnxruntime"))
    for i, s in enumerate(list_test_samples(sample_data)[:4]):
        verdict = inspector.inspect(Frame(id=f"f{i}", seq=i, source="test", image=read_image(s.path))).verdict
        Draft202012Validator(SCHEMA).validate(json.loads(verdict.to_json()))
        assert verdict.status in ("ok", "ng") and verdict.model.method == "test-mean"


def test_the_added_method_brings_its_own_typed_settings(mean_bundle) -> None:
    with pytest.raises(ValidationError, match="pool"):
        ModelConfig(method={"kind": "test-mean", "pool": 0})
    with pytest.raises(ValidationError, match="dims"):
        ModelConfig(method={"kind": "test-mean", "dims": 3})  # PaDiM's key is not this method's


def test_bench_and_the_service_score_through_the_same_pipeline(padim_bundle, mosquitto, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import Config
    from agent.service import build
    from engines.bench import run_bench

    seen: list[Pipeline] = []
    score = Pipeline.score

    def spy(self: Pipeline, images: list[np.ndarray]):
        seen.append(self)
        return score(self, images)

    monkeypatch.setattr(Pipeline, "score", spy)
    run_bench(padim_bundle, ("onnxruntime",), (2,), iterations=1, warmup=0)
    bench_pipelines, seen[:] = list(seen), []
    cfg = Config.model_validate({
        "source": {"kind": "synthetic", "count": 3, "size": [160, 192]},
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "spool_path": str(tmp_path / "spool.sqlite")},
        "agent": {"model": str(padim_bundle.path), "stop_timeout_s": 2.0}})
    service = build(cfg)
    assert service.serve(threading.Event()) == 0
    assert bench_pipelines and all(type(p) is Pipeline for p in bench_pipelines)
    assert len(seen) == 4 and all(p is service.inspector.pipeline for p in seen)  # warm-up and 3 frames
