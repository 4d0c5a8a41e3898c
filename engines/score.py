"""The whole score path as one graph: uint8 tiles in, score maps and image scores out.

    uint8 (B, H, W, 3) BGR
      -> engine graph (normalisation, network)            engines/graph.py
      -> [per tile position: the frame's tiles as one mosaic]
      -> the method's head: score map (B, h, w) [and its own image score]
      -> bilinear upsample to the tile size, separable Gaussian blur
      -> (maps (B, H, W), scores (B,))

``scores`` is the head's own image score where the method has one (SPADE, PatchCore
reweighted), else each blurred map's maximum. The torch runtime runs this module; the other
runtimes run its export, ``model.onnx``, in which the head's statistics (head.safetensors: the
PaDiM Gaussians, the kNN bank, ...) are graph *inputs*, bound once when the runtime starts. So a
recalibration that keeps the network changes data, not the compiled graph, and the torch module
stays the parity oracle for every runtime.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engines.graph import EngineGraph
from engines.methods import implementation
from engines.model import ModelSpec
from engines.tiling import mosaic, unmosaic

__all__ = ["OPSET", "ScoreGraph", "build_score_graph", "export_score_onnx", "gaussian_kernel", "graph_inputs"]

OPSET = 17


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


class ScoreGraph(nn.Module):
    def __init__(self, engine: EngineGraph, head: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.engine, self.head = engine, head
        self.input_hw = spec.input_hw
        self.per_position = spec.per_position
        sigma = spec.blur_sigma
        self.register_buffer("kernel", gaussian_kernel(sigma) if sigma > 0 else torch.ones(1), persistent=False)
        self._cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [o.float() for o in self.engine(x)]
        if self.per_position:
            raw = unmosaic(self.head([mosaic(outputs[0])]), x.shape[0])
            own = None
        else:
            raw, own = self._split(self.head(outputs))
        maps = self._resample(raw.float())
        return maps, own if own is not None else maps.flatten(1).amax(1)

    @staticmethod
    def _split(raw: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return raw if isinstance(raw, tuple) else (raw, None)

    def _resample(self, raw: torch.Tensor) -> torch.Tensor:
        """Bilinear upsample to the tile size, then the Gaussian blur: both linear and separable, so
        together they are one (H, h) matrix on the rows and one (W, w) on the columns, two small
        products per map instead of a full-size upsample and a 33-tap blur over it."""
        rows, cols = self._operators(int(raw.shape[-2]), int(raw.shape[-1]), raw.device)
        return torch.matmul(torch.matmul(rows, raw), cols.t())

    def _operators(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, str(device))
        if key not in self._cache:  # once per map size (in practice once, at the first frame)
            self._cache[key] = (resample_operator(h, self.input_hw[0], self.kernel).to(device),
                                resample_operator(w, self.input_hw[1], self.kernel).to(device))
        return self._cache[key]


def resample_operator(n_in: int, n_out: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): linear upsampling (align_corners=False, as F.interpolate) followed by the
    reflect-padded blur with ``kernel``, as one matrix: the operator applied to unit impulses."""
    impulses = torch.eye(n_in, dtype=torch.float64)[:, None]  # (n_in, 1, n_in)
    up = F.interpolate(impulses, size=n_out, mode="linear", align_corners=False)
    r = kernel.numel() // 2
    if r:
        up = F.conv1d(F.pad(up, (r, r), mode="reflect"), kernel.detach().cpu().double().view(1, 1, -1))
    return up[:, 0].t().float().contiguous()


def build_score_graph(spec: ModelSpec, network_state: dict[str, torch.Tensor],
                      head_tensors: dict[str, torch.Tensor]) -> ScoreGraph:
    from engines.graph import build_engine

    engine = build_engine(spec)
    engine.load_state_dict(network_state, strict=True)
    return ScoreGraph(engine, implementation(spec.method.kind).head(spec, head_tensors), spec).eval()


def statistic_inputs(graph: ScoreGraph, head_tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Head tensor name -> the head buffer that holds it: what the export takes as graph inputs."""
    buffers = {name.rsplit(".", 1)[-1]: name for name, _ in graph.head.named_buffers()}
    return {name: buffers[name] for name in head_tensors if name in buffers}


def export_score_onnx(graph: ScoreGraph, head_tensors: dict[str, torch.Tensor], path: Path,
                      example_batch: int = 2) -> list[str]:
    """Export ``graph`` to ``path``; returns the names of the statistic inputs (after ``input``).
    ``example_batch``: tiles traced through it (a per-tile-position graph needs a frame's tile count)."""
    bound = statistic_inputs(graph, head_tensors)
    names = list(bound)
    stats = tuple(head_tensors[n].float() for n in names)
    wrapper = _StatisticsAsInputs(graph, [bound[n] for n in names]).eval()
    h, w = graph.input_hw
    dummy = torch.zeros(example_batch, h, w, 3, dtype=torch.uint8)
    dynamic = {"input": {0: "batch"}, "map": {0: "batch"}, "score": {0: "batch"}}
    # Statistic sizes (bank rows, gallery images) change with each calibration: dynamic too.
    dynamic.update({n: {i: f"{n}_{i}" for i in range(head_tensors[n].dim())} for n in names})
    with torch.no_grad(), warnings.catch_warnings(), _restored_buffers(graph.head):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (dummy, *stats), str(path), input_names=["input", *names],
                          output_names=["map", "score"], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    return graph_inputs(path)[1:]


def graph_inputs(path: Path) -> list[str]:
    """The exported graph's input names: ``input``, then the statistics it reads (a statistic the head
    does not use, such as the SSIM range of an L2 autoencoder, is not an input)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


class _StatisticsAsInputs(nn.Module):
    """The score graph with its head statistics passed in: the tracer records them as graph inputs."""

    def __init__(self, graph: ScoreGraph, buffer_names: list[str]) -> None:
        super().__init__()
        self.graph, self.buffer_names = graph, buffer_names

    def forward(self, x: torch.Tensor, *stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, value in zip(self.buffer_names, stats):
            owner, _, leaf = name.rpartition(".")
            module = self.graph.head.get_submodule(owner) if owner else self.graph.head
            module._buffers[leaf] = value
        return self.graph(x)


@contextmanager
def _restored_buffers(module: nn.Module) -> Iterator[None]:
    saved = {name: buf for name, buf in module.named_buffers()}
    try:
        yield
    finally:
        for name, buf in saved.items():
            owner, _, leaf = name.rpartition(".")
            (module.get_submodule(owner) if owner else module)._buffers[leaf] = buf
