"""The whole score path as one graph (engines/score.py) and the runtimes that run it.

Per-method parity of ONNX Runtime and OpenVINO against the torch reference lives beside each
method's tests (test_padim, test_knn_methods, test_ae_gan, test_tiling); here: the folded
upsample and blur, the head statistics as graph inputs (a recalibration keeps the graph), the
OpenVINO backend's own settings, and one call per frame for per-tile-position statistics.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
import torch.nn.functional as F

from calibration.calibrate import calibrate
from calibration.data import read_image, test_samples as list_test_samples
from conftest import pipeline, small_model_config
from engines.bundle import HEAD, ONNX, load_bundle
from engines.runtimes import BackendError, RuntimeSettings, open_backend
from engines.score import gaussian_kernel, graph_inputs, resample_operator
from engines.tiling import TilingConfig

OPENVINO_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("sigma", [0.0, 1.5, 4.0])
def test_resample_operator_is_upsample_then_blur(sigma: float) -> None:
    """The two matrices equal a bilinear upsample followed by the reflect-padded Gaussian blur."""
    raw = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(0))
    out_hw = (128, 96)
    up = F.interpolate(raw[:, None], size=out_hw, mode="bilinear", align_corners=False)
    kernel = gaussian_kernel(sigma) if sigma > 0 else torch.ones(1)
    r = kernel.numel() // 2
    if r:
        up = F.pad(up, (r, r, r, r), mode="reflect")
        up = F.conv2d(F.conv2d(up, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    rows, cols = resample_operator(16, out_hw[0], kernel), resample_operator(12, out_hw[1], kernel)
    assert rows.shape == (128, 16) and cols.shape == (96, 12)
    torch.testing.assert_close(rows @ raw @ cols.t(), up[:, 0], rtol=1e-5, atol=1e-6)


def test_statistics_are_graph_inputs_and_recalibration_keeps_the_graph(padim_bundle, sample_data: Path,
                                                                         tmp_path: Path) -> None:
    inputs = graph_inputs(padim_bundle.onnx_path)
    assert inputs[0] == "input" and sorted(inputs[1:]) == ["chol_0", "mean"]  # 48 channels: one block
    stats = padim_bundle.head_tensors()
    sizes = {int(np.prod(t.shape)) for t in stats.values()}
    graph = onnx.load(str(padim_bundle.onnx_path)).graph
    assert not [i.name for i in graph.initializer if int(np.prod(i.dims)) in sizes]  # not baked in
    assert [o.name for o in graph.output] == ["map", "score"]
    # Another hold-out split fits other statistics with the same network: the graph is unchanged.
    cfg = small_model_config()
    cfg.holdout = 0.3
    again = calibrate(sample_data, tmp_path / "again", cfg, progress=False)
    assert again.manifest.files[HEAD] != padim_bundle.manifest.files[HEAD]
    assert again.manifest.files[ONNX] == padim_bundle.manifest.files[ONNX]


def test_runtimes_bind_the_bundle_statistics(padim_bundle, sample_data: Path, tmp_path: Path) -> None:
    """Statistics come from head.safetensors at start-up: changing them changes every runtime's scores
    the same way (the graph is the same file)."""
    from safetensors.torch import save_file

    from engines.bundle import write_manifest

    path = tmp_path / "bundle"
    shutil.copytree(padim_bundle.path, path)
    tensors = load_bundle(path).head_tensors()
    tensors["mean"] = tensors["mean"] + 0.5
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / HEAD))
    moved = write_manifest(path, load_bundle(path, verify=False).manifest)
    images = [read_image(s.path) for s in list_test_samples(sample_data)[:3]]
    before = [f.score for f in pipeline(padim_bundle, "onnxruntime").score(images)]
    ref = [f.score for f in pipeline(moved, "torch").score(images)]
    assert not np.allclose(ref, before, rtol=1e-3)
    for backend in ("onnxruntime", "openvino"):
        np.testing.assert_allclose([f.score for f in pipeline(moved, backend).score(images)], ref, rtol=1e-4)


def test_openvino_names_a_missing_int8_graph(padim_bundle) -> None:
    settings = RuntimeSettings.model_validate({"backend": {"kind": "openvino", "precision": "int8"},
                                               "fallback": False})
    with pytest.raises(BackendError, match=r"model.int8.xml: bundle has no such graph \(python -m "
                                           r"calibration.quantize --runtime openvino"):
        open_backend(padim_bundle, settings)


@pytest.mark.parametrize("hint", ["latency", "throughput"])
def test_openvino_settings_reach_the_compiled_model(padim_bundle, hint: str) -> None:
    settings = RuntimeSettings.model_validate({"backend": {"kind": "openvino", "hint": hint, "streams": 2},
                                               "threads": 2, "fallback": False})
    backend, why = open_backend(padim_bundle, settings)
    compiled = backend.compiled
    assert str(compiled.get_property("PERFORMANCE_HINT")).lower().endswith(hint)
    assert int(compiled.get_property("NUM_STREAMS")) == 2 and int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    assert f"{hint}, 2 stream(s), 2 threads" in why


@pytest.mark.skipif(not OPENVINO_BF16, reason="this CPU has no bfloat16 units (OpenVINO OPTIMIZATION_CAPABILITIES)")
def test_openvino_bf16_runs_in_bf16(padim_bundle, sample_data: Path) -> None:
    """bf16 is a choice with a cost: scores move (judge it with evaluate), so it is never the default."""
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    f32 = pipeline(padim_bundle, "openvino").score(images)
    bf16_pipeline = pipeline(padim_bundle, {"kind": "openvino", "precision": "bf16"})
    assert bf16_pipeline.backend.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    bf16 = bf16_pipeline.score(images)
    moved = [abs(b.score / a.score - 1) for a, b in zip(f32, bf16)]
    assert 0 < max(moved) < 0.5, moved
    f32_backend = pipeline(padim_bundle, "openvino").backend
    assert f32_backend.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


@pytest.fixture(scope="module")
def per_position_bundle(sample_data: Path, tmp_path_factory):
    cfg = small_model_config(input_size=[64, 64])
    cfg.tiling = TilingConfig(enabled=True, overlap=0.25, stats="per_position")
    return calibrate(sample_data, tmp_path_factory.mktemp("pp") / "bundle", cfg, progress=False)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_per_position_sends_each_frame_as_one_call(per_position_bundle, sample_data: Path, backend: str) -> None:
    scorer = pipeline(per_position_bundle, backend, batch_size=2)
    calls: list[int] = []
    run = scorer.backend.run
    scorer.backend.run = lambda x: (calls.append(len(x)), run(x))[1]
    images = [read_image(s.path) for s in list_test_samples(sample_data)[:3]]
    scorer.score(images)
    tiles = scorer.position_tiles
    assert tiles > 2 and calls == [tiles] * 3  # whole frames, whatever the batch size
    with pytest.raises(ValueError, match=r"calibrated on 160x192 frames"):
        scorer.score_frame(np.zeros((400, 400, 3), np.uint8))
