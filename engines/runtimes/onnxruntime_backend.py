"""ONNX Runtime on the CPU: the fastest honest path on boxes without a GPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from engines.bundle import Bundle
from engines.runtimes.base import BackendError


@dataclass
class OrtBackendConfig:
    threads: int = 0                 # intra-op threads; 0 = one per core
    optimization: str = "all"        # basic | extended | all
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


class OrtBackend:
    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, bundle: Bundle, cfg: OrtBackendConfig) -> None:
        import onnxruntime as ort

        if not bundle.onnx_path.is_file():
            raise BackendError(f"{bundle.onnx_path}: bundle has no ONNX network")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.optimization]
        self.session = ort.InferenceSession(str(bundle.onnx_path), opts, providers=list(cfg.providers))
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        # from_numpy shares the buffers: the head reads ONNX Runtime's output without a copy.
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: feed})]
