"""GPU paths against the CPU reference: torch CUDA backend (FP32, FP16 + channels-last + CUDA
graphs), the pinned-memory uploader, the Mahalanobis and kNN heads on the device, and the
TensorRT backend where a plan exists. Skipped with a reason where torch sees no CUDA device."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from engines.knn import KnnIndex
from engines.mahalanobis import MahalanobisHead
from engines.runtimes.base import BackendError
from engines.runtimes.torch_backend import TorchBackend, TorchSettings, Uploader

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none")]

# FP32 on CUDA: TF32 is off by default for matmuls in torch, but cuDNN may pick other algorithms.
CUDA_RTOL = 1e-3
# FP16 network activations: features carry ~1e-3 relative error, distances average it down.
FP16_RTOL = 2e-2


def _input(bundle, batch: int = 4) -> torch.Tensor:
    """A uint8 (B, H, W, 3) batch, as the engine graph takes it."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, *bundle.manifest.input_hw, 3), generator=gen, dtype=torch.uint8)


def test_torch_cuda_backend_matches_cpu(padim_bundle) -> None:
    x = _input(padim_bundle)
    ref = TorchBackend(padim_bundle, TorchSettings(), "cpu").run(x)[0]
    out = TorchBackend(padim_bundle, TorchSettings(channels_last=True), "cuda").run(x.cuda())[0]
    torch.testing.assert_close(out.cpu(), ref, rtol=CUDA_RTOL, atol=CUDA_RTOL * ref.abs().max().item())


def test_fp16_cuda_graph_backend_matches_cpu(padim_bundle) -> None:
    x = _input(padim_bundle)
    ref = TorchBackend(padim_bundle, TorchSettings(), "cpu").run(x)[0]
    fast = TorchBackend(padim_bundle, TorchSettings(half=True, channels_last=True, cuda_graphs=[4]), "cuda")
    assert 4 in fast.graphs
    a = fast.run(x.cuda())[0]            # graph replay
    b = fast.run(x[:3].cuda())[0]        # no graph for batch 3: eager
    torch.testing.assert_close(a.cpu(), ref, rtol=FP16_RTOL, atol=FP16_RTOL * ref.abs().max().item())
    torch.testing.assert_close(b, a[:3], rtol=FP16_RTOL, atol=FP16_RTOL * ref.abs().max().item())
    c = fast.run((x // 2).cuda())[0]     # a later replay must not change what was handed out
    assert not torch.equal(a, c)
    torch.testing.assert_close(a.cpu(), ref, rtol=FP16_RTOL, atol=FP16_RTOL * ref.abs().max().item())


def test_uploader_delivers_each_batch_intact() -> None:
    up = Uploader(torch.device("cuda"))
    batches = [np.full((4, 8, 8, 3), i, dtype=np.uint8) for i in range(5)]
    outs = [up.put(b) for b in batches]  # five puts through two pinned buffers
    for b, o in zip(batches, outs):
        assert o.is_cuda and torch.equal(o.cpu(), torch.from_numpy(b))


def test_mahalanobis_head_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(1)
    p, d = 64, 48
    a = torch.randn(p, d, d, generator=gen)
    inv = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d)
    mean = torch.randn(p, d, generator=gen)
    feats = torch.randn(8, d, 8, 8, generator=gen) * 2
    ref = MahalanobisHead.from_inverse(mean, inv)(feats)
    head = MahalanobisHead.from_inverse(mean, inv).cuda()
    torch.testing.assert_close(head(feats.cuda()).cpu(), ref, rtol=1e-4, atol=0)


def test_knn_head_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(5000, 64, generator=gen), torch.randn(300, 64, generator=gen)
    ref = KnnIndex(bank).search(queries, k=3)
    out = KnnIndex(bank.cuda(), max_bytes=1 << 20).search(queries.cuda(), k=3)  # many small chunks
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    half = KnnIndex(bank.cuda(), storage_dtype=torch.float16).search(queries.cuda(), k=3)
    torch.testing.assert_close(half.cpu(), ref, rtol=2e-3, atol=2e-3)


def test_tensorrt_backend_matches_torch_where_a_plan_exists(padim_bundle) -> None:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed")
    from engines.runtimes.tensorrt_backend import TensorRTBackend, TensorRTSettings

    try:
        trt = TensorRTBackend(padim_bundle, TensorRTSettings(precision="fp32"))
    except BackendError as e:
        pytest.skip(f"no fp32 plan for this GPU (run build-engine --precision fp32): {e}")
    x = _input(padim_bundle)
    ref = TorchBackend(padim_bundle, TorchSettings(), "cpu").run(x)[0]
    torch.testing.assert_close(trt.run(x.cuda())[0].cpu(), ref, rtol=CUDA_RTOL, atol=CUDA_RTOL * ref.abs().max().item())
