"""The torch runtime: the reference, on the CPU or a CUDA device.

On CUDA it is also the GPU path that can be verified without TensorRT: channels-last
layout, FP16 weights, CUDA graphs captured at start-up for fixed batch sizes, and an
`Uploader` that copies the next batch from pinned host memory on its own stream while the
current one is scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.bundle import Bundle
from engines.network import build_network
from engines.runtimes.base import BackendError


@dataclass
class TorchBackendConfig:
    device: str = "cpu"
    half: bool = False                  # FP16 weights and activations (CUDA only)
    channels_last: bool = False
    cuda_graphs: tuple[int, ...] = ()   # batch sizes captured as CUDA graphs at start-up (CUDA only)


class TorchBackend:
    name = "torch"

    def __init__(self, bundle: Bundle, cfg: TorchBackendConfig) -> None:
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but torch sees no CUDA device")
        if self.device.type != "cuda" and (cfg.half or cfg.cuda_graphs):
            raise BackendError("torch backend: half and cuda_graphs need a CUDA device")
        self.cfg = cfg
        self.input_hw = bundle.manifest.input_hw
        self.net = build_network(bundle.manifest.network, bundle.network_state()).to(self.device)
        if cfg.half:
            self.net = self.net.half()
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.graphs = {b: self._capture(b) for b in cfg.cuda_graphs}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.half if self.cfg.half else torch.float32)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    @torch.inference_mode()
    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, list[torch.Tensor]]:
        static_in = self._prepare(torch.zeros(batch, 3, *self.input_hw, device=self.device))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for _ in range(2):
                self._forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        return graph, static_in, static_out

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured = self.graphs.get(x.shape[0])
        if captured is not None:
            graph, static_in, static_out = captured
            static_in.copy_(self._prepare(x))
            graph.replay()
            # The graph's outputs are overwritten by the next replay: hand out copies.
            return [o.float() if o.dtype != torch.float32 else o.clone() for o in static_out]
        return [o.float() for o in self._forward(self._prepare(x))]


class Uploader:
    """Host uint8 batches (B, H, W, 3) -> device tensors, copied from pinned memory on a copy stream.

    ``put`` starts the copy of the next batch and returns at once; the consumer stream waits
    for that copy only when it uses the tensor, so the upload overlaps the scoring of the
    batch before it. Two pinned buffers alternate so that a copy in flight is never
    overwritten. On the CPU it is a plain ``torch.from_numpy``.
    """

    def __init__(self, device: torch.device, max_batch: int, hw: tuple[int, int]) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        shape = (max_batch, hw[0], hw[1], 3)
        self.pinned = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.done = [None, None]
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.turn = 0

    def put(self, batch: np.ndarray) -> torch.Tensor:
        if not self.cuda:
            return torch.from_numpy(batch)
        i, self.turn = self.turn, 1 - self.turn
        if self.done[i] is not None:
            self.done[i].synchronize()  # the copy that last used this buffer has finished
        host = self.pinned[i][: batch.shape[0]]
        host.numpy()[...] = batch
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            self.done[i] = torch.cuda.Event()
            self.done[i].record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(self.done[i])
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev
