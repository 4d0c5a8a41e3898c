"""ONNX Runtime on the CPU: the bundle's score graph (model.onnx) in one session.

The graph takes the uint8 tiles and returns maps and image scores (engines/score.py). Its head
statistics are graph inputs; at start-up they become the session's initializers (the graph is
edited in memory, the bundle is not), so ONNX Runtime can pre-pack them once, as it does weights:
measured 15 vs 16 ms at batch 1 and 93 vs 100 ms at batch 8 against feeding them per call (PaDiM,
Lite0, 256 px, 2 cores). The outputs come back as torch tensors sharing ONNX Runtime's buffers.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import BackendError, statistics

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings

NETWORKS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# A serialised ONNX model must stay under protobuf's 2 GiB; above this the statistics are fed instead.
INITIALIZER_BYTES = 1 << 30


class OnnxRuntimeSettings(PluginSettings):
    kind: Literal["onnxruntime"] = "onnxruntime"
    network: Literal["fp32", "int8"] = Field(
        "fp32", description="fp32 (model.onnx) | int8 (model.int8.onnx, written by python -m calibration.quantize)")
    optimization: Literal["basic", "extended", "all"] = Field("all", description="graph optimisation level")
    spinning: bool = Field(False, description="busy-wait between ops: faster on an idle box, steals shared cores")


class OnnxRuntimeBackend:
    uses_torch_threads = False
    device: "torch.device"

    def __init__(self, bundle: "Bundle", settings: OnnxRuntimeSettings, threads: int = 0) -> None:
        import onnxruntime as ort
        import torch

        from engines.score import graph_inputs

        self.device = torch.device("cpu")
        path = bundle.path / NETWORKS[settings.network]
        if not path.is_file():
            raise BackendError(f"{path}: bundle has no such ONNX graph")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors: graph-cleanup warnings (unused initializers) are not the user's
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[settings.optimization]
        spin = "1" if settings.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        stats = statistics(bundle, graph_inputs(path)[1:])
        if sum(a.nbytes for a in stats.values()) <= INITIALIZER_BYTES:
            model, self.feed = with_initializers(path, stats), {}
        else:
            model, self.feed = str(path), stats
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime" if settings.network == "fp32" else f"onnxruntime-{settings.network}"

    def run(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        import numpy as np
        import torch

        maps, scores = self.session.run(None, {self.input_name: np.ascontiguousarray(x.cpu().numpy()), **self.feed})
        return torch.from_numpy(maps), torch.from_numpy(scores)


def with_initializers(path: "os.PathLike[str]", stats: dict[str, "np.ndarray"]) -> bytes:
    """The graph at ``path`` with its statistic inputs turned into initializers holding ``stats``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept = [i for i in graph.input if i.name not in stats]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in stats.items())
    return model.SerializeToString()


def start(bundle: "Bundle", settings: OnnxRuntimeSettings, runtime: "RuntimeSettings") -> tuple[OnnxRuntimeBackend, str]:
    return OnnxRuntimeBackend(bundle, settings, runtime.threads), ""


PLUGINS = [Plugin("onnxruntime", OnnxRuntimeSettings, lambda: importlib.import_module(__name__),
                  "ONNX Runtime on the CPU (FP32, or the INT8 graph)")]
