"""build-engine without TensorRT, Mahalanobis head variants (Cholesky, FP16) against the
reference, the tuned CPU backends and INT8 quantisation (ONNX Runtime and OpenVINO/NNCF)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.data import read_image, test_samples as list_test_samples
from engines.build import is_score_graph
from engines.bundle import ONNX, load_bundle, write_manifest
from engines.mahalanobis import MahalanobisHead, cholesky_blocks, inverse_from_blocks
from engines.previous_path import InverseHead
from engines.runtimes.base import BackendError
from engines.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeSettings
from engines.runtimes.torch_backend import TorchBackend, TorchSettings, Uploader
from engines.pipeline import model_inputs

REPO = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
# FP32 variants: the same sums in another order. FP16 storage of the Cholesky factor: whitened
# values keep the relative error of a distance near 2^-11 / sqrt(D); 1e-3 is the runtime tolerance.
EXACT_RTOL, PARITY_RTOL = 1e-5, 1e-3


def _copy(bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle.path, dst)
    return dst


def _agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; this covers the machine without it")
def test_build_engine_without_tensorrt_exports_onnx_and_exits_3(padim_bundle, tmp_path: Path) -> None:
    path = _copy(padim_bundle, tmp_path)
    (path / ONNX).unlink()  # a bundle without the score graph: build-engine exports it first
    write_manifest(path, load_bundle(path, verify=False).manifest)
    assert ONNX not in load_bundle(path).manifest.files
    r = _agent("build-engine", "--model", str(path), "--precision", "fp16", "--batch", "4")
    assert r.returncode == 3
    said = [line for line in r.stderr.splitlines() if "TensorRT" in line]  # besides the export's log line
    assert len(said) == 1 and said[0].startswith("build-engine: TensorRT is not installed here"), r.stderr
    assert is_score_graph(path / ONNX) and ONNX in load_bundle(path).manifest.files


def test_build_engine_int8_needs_calibration_images(padim_bundle) -> None:
    r = _agent("build-engine", "--model", str(padim_bundle.path), "--precision", "int8")
    assert r.returncode == 2 and "needs --data DIR with good images" in r.stderr


def _spd(p: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(p, d, d, generator=gen)
    return a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d)


def test_cholesky_blocks_score_as_the_full_inverse() -> None:
    gen = torch.Generator().manual_seed(0)
    p, d = 36, 150
    mean, inv = torch.randn(p, d, generator=gen), _spd(p, d, gen)
    feats = torch.randn(5, d, 6, 6, generator=gen) * 3
    x = feats.flatten(2).permute(0, 2, 1)
    direct = torch.einsum("bpd,pde,bpe->bp", x.double() - mean.double(), inv.double(),
                          x.double() - mean.double()).sqrt().reshape(5, 6, 6).float()
    blocks = cholesky_blocks(inv)
    assert [tuple(blocks[n].shape) for n in sorted(blocks)] == [(p, 150, 64), (p, 86, 64), (p, 22, 22)]
    head = MahalanobisHead(mean, blocks)
    torch.testing.assert_close(head(feats), direct, rtol=EXACT_RTOL, atol=1e-5)
    # The blocks hold (K + 1) / 2K of the full matrices (K = 3 here): what a batch-1 call reads.
    assert sum(b.numel() for b in blocks.values()) < 0.7 * inv.numel()
    torch.testing.assert_close(MahalanobisHead.from_inverse(mean, inv)(feats), head(feats), rtol=0, atol=0)
    torch.testing.assert_close(inverse_from_blocks(blocks), inv, rtol=1e-5, atol=1e-5)


def _features(bundle, x: torch.Tensor) -> torch.Tensor:
    from engines.graph import build_engine

    engine = build_engine(bundle.manifest.model)
    engine.load_state_dict(bundle.network_state(), strict=True)
    with torch.no_grad():
        return engine(x)[0]


def test_gaussians_invert_after_torch_was_set_to_two_threads() -> None:
    # On a 2-core AMD EPYC, torch 2.13's MKL failed its threaded LU of 150-channel covariances once
    # torch.set_num_threads(2) had run (as a backend or the pipeline does): "Parameter 6 was incorrect
    # on entry to DLASWP", then a hang. The fit inverts on one thread (engines/threads.py).
    code = """
import torch
from engines.mahalanobis import GaussianAccumulator, cholesky_blocks
torch.set_num_threads(2)
acc = GaussianAccumulator(64, 150)
acc.add(torch.randn(400, 150, 64))
mean, inv = acc.finish(0.01)
assert torch.isfinite(inv).all() and torch.isfinite(cholesky_blocks(inv)["chol_0"]).all()
print("inverted")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "inverted" in done.stdout, done.stderr[-2000:]
    assert "DLASWP" not in done.stderr


def test_the_previous_paths_full_inverse_head_scores_as_the_blocks(padim_bundle, sample_data: Path) -> None:
    t = padim_bundle.head_tensors()
    assert "inv_cov" not in t and {"chol_0", "mean"} <= set(t)
    feats = _features(padim_bundle, _inputs(padim_bundle, sample_data, 4))
    ref = MahalanobisHead(t["mean"], t)(feats)
    torch.testing.assert_close(InverseHead(t)([feats]), ref, rtol=PARITY_RTOL, atol=0)


def _inputs(bundle, sample_data: Path, n: int) -> torch.Tensor:
    """uint8 engine inputs of the first ``n`` test images, as the pipeline prepares them."""
    m = bundle.manifest
    images = [read_image(s.path) for s in list_test_samples(sample_data)[:n]]
    return torch.from_numpy(np.stack([t for i in images for t in model_inputs(i, m.input_hw, m.model.tiling)]))


def test_channels_last_torch_matches_reference(padim_bundle, sample_data: Path) -> None:
    x = _inputs(padim_bundle, sample_data, 2)
    ref = TorchBackend(padim_bundle, TorchSettings()).run(x)
    out = TorchBackend(padim_bundle, TorchSettings(channels_last=True)).run(x)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
    with pytest.raises(BackendError, match="need a CUDA device"):
        TorchBackend(padim_bundle, TorchSettings(half=True))


def test_cpu_uploader_shares_the_host_batch() -> None:
    batch = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    out = Uploader(torch.device("cpu")).put(batch)
    assert out.data_ptr() == batch.ctypes.data  # no copy on the CPU path


class _ThreadsSeen:
    """A real backend that notes torch's CPU thread count at each call: what the pipeline set around it."""

    def __init__(self, backend) -> None:
        self.backend, self.seen = backend, []

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def run(self, x: torch.Tensor):
        self.seen.append(torch.get_num_threads())
        return self.backend.run(x)


@pytest.mark.parametrize("backend, during", [("onnxruntime", 1), ("openvino", 1), ("torch", 2)])
def test_host_work_beside_a_pool_of_its_own_runs_on_one_torch_thread(padim_bundle, sample_data: Path,
                                                                      backend: str, during: int) -> None:
    # Two torch threads spin after each small op of the pipeline and take the cores from the next
    # OpenVINO or ONNX Runtime call; torch's own backend keeps them, and nothing outlives the call.
    from engines.pipeline import Pipeline
    from engines.runtimes import RuntimeSettings, open_backend

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = RuntimeSettings.model_validate({"backend": backend, "device": "cpu", "fallback": False})
        seen = _ThreadsSeen(open_backend(padim_bundle, settings)[0])
        image = read_image(list_test_samples(sample_data)[0].path)
        Pipeline(padim_bundle, seen, settings).score([image, image])
        assert seen.seen == [during] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ort_backend_names_a_missing_network(padim_bundle) -> None:
    with pytest.raises(BackendError, match="model.int8.onnx: bundle has no such ONNX graph"):
        OnnxRuntimeBackend(padim_bundle, OnnxRuntimeSettings(network="int8"))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_quantisation_writes_a_hashed_graph(padim_bundle, sample_data: Path, tmp_path: Path,
                                                runtime: str) -> None:
    from engines.quantize import INT8_FILES, quantize_bundle
    from engines.runtimes import RuntimeSettings, open_backend

    path = _copy(padim_bundle, tmp_path)
    bundle = quantize_bundle(load_bundle(path), sample_data, images=4, runtime=runtime)
    name = INT8_FILES[runtime]
    assert name in load_bundle(path).manifest.files  # re-hashed: loads with verification
    assert bundle.manifest.model_id != padim_bundle.manifest.model_id
    x = _inputs(bundle, sample_data, 2)
    int8_setting = {"kind": "onnxruntime", "network": "int8"} if runtime == "onnxruntime" else \
        {"kind": "openvino", "precision": "int8"}
    int8, _ = open_backend(bundle, RuntimeSettings.model_validate({"backend": int8_setting, "fallback": False}))
    assert int8.name == f"{runtime}-int8"
    maps, scores = int8.run(x)
    assert maps.shape == (2, *bundle.manifest.input_hw) and torch.isfinite(maps).all() and scores.shape == (2,)
    # Accuracy is judged on evaluate metrics (python -m calibration.quantize --measure), not parity.
    # Here: only the network is quantised; the statistics and everything after the engine stay FP32.
    quantised = _quantised(path / name, runtime)
    assert quantised and not quantised & set(bundle.head_tensors()), quantised
    assert all(n.startswith("/graph/engine/") or n.startswith("onnx::") for n in quantised - {"input"}), quantised


def _quantised(path: Path, runtime: str) -> set[str]:
    """What the INT8 graph quantises, by node name: the producers of what QuantizeLinear nodes
    quantise (ONNX), the operations that read FakeQuantize outputs (OpenVINO; its weights reach
    FakeQuantize through generated Reshape nodes, so the consumers are the meaningful names)."""
    if runtime == "onnxruntime":
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        producer = {o: n.name for n in graph.node for o in n.output}
        return {producer.get(n.input[0], n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"}
    import openvino as ov

    model = ov.Core().read_model(str(path))
    return {target.get_node().get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
            for target in op.output(0).get_target_inputs()}
