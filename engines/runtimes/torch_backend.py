"""The torch runtime: the reference, on the CPU or a CUDA device.

It runs the score graph itself (engines/score.py), the module every other runtime's export is
held to. On CUDA it is also the GPU path that can be verified without TensorRT: channels-last layout,
FP16 network weights, and CUDA graphs of the whole score path captured at start-up for fixed batch sizes; batches come up
from pinned host memory on a copy stream (``Uploader``). The CUDA paths are unverified in the
workplace this was written in (no GPU; see README).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import BackendError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings


class TorchSettings(PluginSettings):
    kind: Literal["torch"] = "torch"
    half: bool = Field(False, description="FP16 network weights and activations, FP32 head (CUDA only)")
    channels_last: bool = Field(False, description="channels-last memory layout for the convolutions")
    cuda_graphs: list[int] = Field(default_factory=list, description="batch sizes captured as CUDA graphs at "
                                                                     "start-up (CUDA only)")


class TorchBackend:
    uses_torch_threads = True
    name = "torch"

    def __init__(self, bundle: "Bundle", settings: TorchSettings, device: str = "cpu") -> None:
        import torch

        from engines.score import build_score_graph

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but torch sees no CUDA device")
        if self.device.type != "cuda" and (settings.half or settings.cuda_graphs):
            raise BackendError("torch backend: half and cuda_graphs need a CUDA device")
        self.settings = settings
        self.input_hw = bundle.manifest.input_hw
        self.net = build_score_graph(bundle.manifest.model, bundle.network_state(), bundle.head_tensors())
        self.net = self.net.to(self.device)
        if settings.half:
            self.net.engine.half()
        if settings.channels_last:
            self.net.engine.to(memory_format=torch.channels_last)
        self.uploader = Uploader(self.device)
        self.graphs = {b: self._capture(b) for b in settings.cuda_graphs}

    def run(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        with torch.inference_mode():
            x = self.uploader.put(x)
            captured = self.graphs.get(x.shape[0])
            if captured is not None:
                graph, static_in, (maps, scores) = captured
                static_in.copy_(x)
                graph.replay()
                # The graph's outputs are overwritten by the next replay: hand out copies.
                return maps.clone(), scores.clone()
            return self.net(x)

    def _capture(self, batch: int) -> tuple[Any, "torch.Tensor", tuple["torch.Tensor", "torch.Tensor"]]:
        import torch

        with torch.inference_mode():
            static_in = torch.zeros(batch, *self.input_hw, 3, dtype=torch.uint8, device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
                for _ in range(2):
                    self.net(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.net(static_in)
        return graph, static_in, static_out


class Uploader:
    """Host uint8 batches -> device tensors, copied from pinned memory on a copy stream.

    ``put`` starts the copy and returns at once; the consumer stream waits for that copy only
    when it uses the tensor, so the upload overlaps the scoring of the batch before it. Two
    pinned buffers alternate so that a copy in flight is never overwritten. On the CPU (or for
    a tensor already on the device) it hands the tensor through.
    """

    def __init__(self, device: "torch.device") -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.pinned: list[Any] = [None, None]
        self.done: list[Any] = [None, None]
        self.stream = None
        self.turn = 0

    def put(self, batch: "torch.Tensor | np.ndarray") -> "torch.Tensor":
        import torch

        batch = torch.as_tensor(batch)
        if not self.cuda or batch.device.type == "cuda":
            return batch.to(self.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        i, self.turn = self.turn, 1 - self.turn
        if self.done[i] is not None:
            self.done[i].synchronize()  # the copy that last used this buffer has finished
        if self.pinned[i] is None or self.pinned[i].numel() < batch.numel():
            self.pinned[i] = torch.empty(batch.numel(), dtype=batch.dtype, pin_memory=True)
        host = self.pinned[i][: batch.numel()].view(batch.shape)
        host.copy_(batch)
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            self.done[i] = torch.cuda.Event()
            self.done[i].record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(self.done[i])
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev


def start(bundle: "Bundle", settings: TorchSettings, runtime: "RuntimeSettings") -> tuple[TorchBackend, str]:
    import torch

    device = runtime.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = TorchBackend(bundle, settings, device)
    if runtime.threads and backend.device.type == "cpu":
        torch.set_num_threads(runtime.threads)
    return backend, f"on {device}"


PLUGINS = [Plugin("torch", TorchSettings, lambda: importlib.import_module(__name__),
                  "torch, the reference: CPU, or CUDA with FP16, channels-last and CUDA graphs")]
