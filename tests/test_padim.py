"""PaDiM end to end on synthetic data: bundle contents, hash refusal, runtime parity, CLI."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.data import read_image, test_samples as list_test_samples
from engines.bundle import BundleError, load_bundle
from engines.mahalanobis import GaussianAccumulator, MahalanobisHead
from conftest import assert_runtime_parity, pipeline
from engines.runtimes import open_backend

REPO = Path(__file__).resolve().parents[1]
# ONNX Runtime fuses and reorders float32 ops; Mahalanobis distances amplify that a little.
PARITY_RTOL = 1e-3


def test_streaming_gaussian_matches_batch_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 6, 5, generator=gen) * 2 + 30  # large offset: cancellation would show
    acc = GaussianAccumulator(5, 6)
    for chunk in emb.split(7):
        acc.add(chunk)
    mean, inv = acc.finish(reg=0.01)
    x = emb.permute(2, 0, 1).double()
    ref_cov = torch.stack([torch.cov(p.T) for p in x]) + 0.01 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(mean, x.mean(1).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(inv, torch.linalg.inv(ref_cov).float(), rtol=1e-3, atol=1e-4)


def test_mahalanobis_head_matches_direct_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    p, d = 12, 4
    mean = torch.randn(p, d, generator=gen)
    a = torch.randn(p, d, d, generator=gen)
    inv = a @ a.transpose(1, 2) + torch.eye(d)
    feats = torch.randn(3, d, 3, 4, generator=gen)
    out = MahalanobisHead.from_inverse(mean, inv)(feats)
    x = feats.flatten(2).permute(0, 2, 1)  # (B, P, D)
    ref = torch.einsum("bpd,pde,bpe->bp", x - mean, inv, x - mean).sqrt().reshape(3, 3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bundle_holds_manifest_tensors_and_onnx(padim_bundle) -> None:
    m = padim_bundle.manifest
    assert set(m.files) == {"network.safetensors", "head.safetensors", "model.onnx"}
    assert m.method == "padim" and m.model_id.startswith("padim-") and m.model.method.dims == 48
    assert m.decision.image_threshold > m.decision.center and m.decision.pixel_threshold > 0
    assert m.model.taps == ["stage3", "stage4", "stage5"]
    assert {"torch", "onnxruntime"} <= set(m.versions)
    # The channel subset is inside the engine: its output has exactly the kept channels.
    assert padim_bundle.head_tensors()["mean"].shape[1] == 48
    for name in m.files:  # nothing executable: safetensors and ONNX only, no pickle
        assert not (padim_bundle.path / name).read_bytes().startswith(b"\x80")


def test_altered_tensor_file_is_refused(padim_bundle, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(padim_bundle.path, copy)
    data = bytearray((copy / "head.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="head.safetensors: content hash mismatch"):
        load_bundle(copy)
    r = subprocess.run([sys.executable, "-m", "agent", "evaluate", "--model", str(copy), "--data", str(copy)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "content hash mismatch" in r.stderr and padim_bundle.manifest.model_id in r.stderr


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpu_runtimes_match_torch_reference(padim_bundle, sample_data: Path, backend: str) -> None:
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    assert_runtime_parity(padim_bundle, images, backend, PARITY_RTOL)


def test_auto_backend_without_cuda_times_the_cpu_runtimes(padim_bundle) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; auto picks a GPU backend")
    backend, why = open_backend(padim_bundle)
    times = dict(re.findall(r"(openvino|onnxruntime) ([0-9.]+) ms", why))
    assert set(times) == {"openvino", "onnxruntime"} and "no CUDA device" in why, why
    assert backend.name == min(times, key=lambda k: float(times[k])), why


def test_defects_score_above_good(padim_bundle, sample_data: Path) -> None:
    samples = list_test_samples(sample_data)
    scorer = pipeline(padim_bundle)
    scores = np.array([scorer.score_frame(read_image(s.path)).score for s in samples])
    labels = np.array([s.label for s in samples])
    assert scores[labels == 1].mean() > scores[labels == 0].max()


def test_calibrate_and_evaluate_commands(sample_data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  input_size: [128, 128]\n  method:\n    dims: 32\n")
    out = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "agent", "calibrate", "--data", str(sample_data), "--out", str(out),
                        "--config", str(cfg), "--method", "padim"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_id"].startswith("padim-")
    report = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "agent", "evaluate", "--model", str(out), "--data", str(sample_data),
                        "--json", "--report", str(report)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "per_type"):
        assert key in metrics
    assert metrics["image_auroc"] > 0.9
    assert (report / "index.html").is_file() and (report / "roc.png").is_file()


def test_calibrate_on_missing_data_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "calibrate", "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "train/good" in r.stderr


def test_calibrate_warns_where_frames_are_squeezed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # KolektorSDD's 1250 x 500 frames in the default 256 x 256 input: pixel AUPR 0.10 against 0.22 at
    # [640, 256]. Crops of many shapes (MTD's) have no one aspect to keep: no advice for them.
    import logging

    from calibration.calibrate import calibrate, squeeze_advice
    from calibration.synthetic import write_dataset
    from conftest import small_model_config

    advice = squeeze_advice([(1250, 500)] * 3, (256, 256))
    assert advice is not None and "squeezed 2.5:1" in advice and "model.input_size [640, 256]" in advice
    assert squeeze_advice([(100, 630), (300, 300), (400, 300)], (256, 256)) is None
    assert squeeze_advice([(500, 1250)], (256, 640)) is None

    data = write_dataset(tmp_path / "wide", n_train=10, n_test_good=2, n_test_defect=2, size=(64, 192), seed=2)
    with caplog.at_level(logging.WARNING, logger="calibration.calibrate"):
        calibrate(data, tmp_path / "b", small_model_config(), progress=False)
    assert any("squeezed 3.0:1" in r.getMessage() and "[128, 384]" in r.getMessage() for r in caplog.records)
