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
    model: str = "model.onnx"        # or "model.int8.onnx", written by engines.quantize
    spinning: bool = False           # busy-wait between ops: faster on an idle box, steals shared cores


class OrtBackend:
    name = "onnxruntime"  # the INT8 network reports "onnxruntime-int8"
    device = torch.device("cpu")

    def __init__(self, bundle: Bundle, cfg: OrtBackendConfig) -> None:
        import onnxruntime as ort

        path = bundle.path / cfg.model
        if not path.is_file():
            raise BackendError(f"{path}: bundle has no such ONNX network")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.optimization]
        spin = "1" if cfg.spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self.session = ort.InferenceSession(str(path), opts, providers=list(cfg.providers))
        self.input_name = self.session.get_inputs()[0].name
        if cfg.model != "model.onnx":
            self.name = "onnxruntime-" + cfg.model.removeprefix("model.").removesuffix(".onnx")

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        # from_numpy shares the buffers: the head reads ONNX Runtime's output without a copy.
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: feed})]
