"""The frame path before the one-graph score (kept for ``bench``, never served).

``bench --backend onnxruntime-previous`` times it in the same run as the current backends, so
a speed-up is a ratio measured side by side, not against a figure from another day. It is what
the agent ran until the score graph: the engine graph alone exported to ONNX and run in ONNX
Runtime, then the head in torch on ONNX Runtime's outputs, then a full-size bilinear upsample
and a 2-D separable Gaussian blur (a depthwise convolution over the batch), each a stage of
its own (``stages_ms``). PaDiM's head is the one of that time too: one batched product over the
full inverse covariances.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engines.bundle import Bundle
from engines.export import export_onnx
from engines.graph import build_engine
from engines.mahalanobis import inverse_from_blocks
from engines.methods import implementation
from engines.score import gaussian_kernel
from engines.tiling import mosaic, unmosaic

NAME = "onnxruntime-previous"


class PreviousPath:
    name = NAME
    uses_torch_threads = True  # its head and postprocess are torch ops, as they were

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        import onnxruntime as ort

        spec = bundle.manifest.model
        self.device = torch.device("cpu")
        self.input_hw, self.per_position = spec.input_hw, spec.per_position
        engine = build_engine(spec)
        engine.load_state_dict(bundle.network_state(), strict=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(engine, Path(tmp) / "engine.onnx", spec.input_hw)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        tensors = bundle.head_tensors()
        self.head = (InverseHead(tensors) if spec.method.kind == "padim" else
                     implementation(spec.method.kind).head(spec, tensors)).eval()
        self.kernel = gaussian_kernel(spec.blur_sigma) if spec.blur_sigma > 0 else None
        self.stages_ms = {"network": 0.0, "head": 0.0, "postprocess": 0.0}

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        outputs = [torch.from_numpy(o) for o in self.session.run(None, {"input": x.numpy()})]
        t1 = time.perf_counter()
        own = None
        if self.per_position:
            raw = unmosaic(self.head([mosaic(outputs[0])]), x.shape[0])
        else:
            raw = self.head(outputs)
            raw, own = raw if isinstance(raw, tuple) else (raw, None)
        t2 = time.perf_counter()
        maps = self._postprocess(raw)
        scores = own if own is not None else maps.flatten(1).amax(1)
        t3 = time.perf_counter()
        for stage, ms in (("network", t1 - t0), ("head", t2 - t1), ("postprocess", t3 - t2)):
            self.stages_ms[stage] += ms * 1000.0
        return maps, scores

    def _postprocess(self, raw: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(raw[:, None].float(), size=self.input_hw, mode="bilinear", align_corners=False)[:, 0]
        if self.kernel is None:
            return up
        b, r = up.shape[0], self.kernel.numel() // 2
        x = F.pad(up[None], (r, r, r, r), mode="reflect")
        x = F.conv2d(x, self.kernel.view(1, 1, 1, -1).expand(b, 1, 1, -1), groups=b)
        return F.conv2d(x, self.kernel.view(1, 1, -1, 1).expand(b, 1, -1, 1), groups=b)[0]


class InverseHead(torch.nn.Module):
    """PaDiM's head before the Cholesky blocks: ``d^T S^-1 d`` by one bmm over the full inverses."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.mean = tensors["mean"].float()
        self.inv_cov = tensors["inv_cov"].float() if "inv_cov" in tensors else inverse_from_blocks(tensors)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        b, _, h, w = outputs[0].shape
        diff = (outputs[0].flatten(2).permute(2, 0, 1).float() - self.mean[:, None, :]).contiguous()
        dist = (torch.bmm(diff, self.inv_cov) * diff).sum(-1)
        return dist.clamp_min(0).sqrt().t().reshape(b, h, w)
