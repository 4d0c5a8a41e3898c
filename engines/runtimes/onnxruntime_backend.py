"""ONNX Runtime on the CPU: the fastest honest path on boxes without a GPU.

The network's uint8 input goes to ONNX Runtime as it is (the graph normalises), and its
outputs come back as torch tensors sharing ONNX Runtime's buffers (no copy).
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import BackendError

if TYPE_CHECKING:
    import torch

    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings

NETWORKS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


class OnnxRuntimeSettings(PluginSettings):
    kind: Literal["onnxruntime"] = "onnxruntime"
    network: Literal["fp32", "int8"] = Field(
        "fp32", description="fp32 (model.onnx) | int8 (model.int8.onnx, written by python -m calibration.quantize)")
    optimization: Literal["basic", "extended", "all"] = Field("all", description="graph optimisation level")
    spinning: bool = Field(False, description="busy-wait between ops: faster on an idle box, steals shared cores")


class OnnxRuntimeBackend:
    device: "torch.device"

    def __init__(self, bundle: "Bundle", settings: OnnxRuntimeSettings, threads: int = 0) -> None:
        import onnxruntime as ort
        import torch

        self.device = torch.device("cpu")
        path = bundle.path / NETWORKS[settings.network]
        if not path.is_file():
            raise BackendError(f"{path}: bundle has no such ONNX network")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[settings.optimization]
        spin = "1" if settings.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime" if settings.network == "fp32" else f"onnxruntime-{settings.network}"

    def run(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        import numpy as np
        import torch

        feed = np.ascontiguousarray(x.cpu().numpy())
        return [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: feed})]


def start(bundle: "Bundle", settings: OnnxRuntimeSettings, runtime: "RuntimeSettings") -> tuple[OnnxRuntimeBackend, str]:
    return OnnxRuntimeBackend(bundle, settings, runtime.threads), ""


PLUGINS = [Plugin("onnxruntime", OnnxRuntimeSettings, lambda: importlib.import_module(__name__),
                  "ONNX Runtime on the CPU (FP32 or the INT8 network)")]
