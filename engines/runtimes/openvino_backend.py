"""OpenVINO on the CPU: the bundle's score graph (model.onnx), compiled once per start.

OpenVINO reads the ONNX graph directly. The head statistics, graph inputs in the file, are made
constants of the model before it is compiled, so the compiler lays them out once for its own
kernels (as inputs they cost a 92 MB copy per call: 29 vs 7 ms at batch 1, PaDiM Lite0 256 px).
The bundle is not changed: a recalibration still changes data, not the graph.

Precision: ``f32`` holds the torch reference (parity tests). OpenVINO's own default on CPUs with
bfloat16 units is bf16; here it is a choice, ``bf16`` (or ``f16``), because it moves scores by
about 1 % (the network's features, not the head): check ``evaluate`` before serving it. ``int8``
serves ``model.int8.xml``, the graph quantised by NNCF with the head kept in FP32 (``python -m
calibration.quantize --runtime openvino``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import BackendError, statistics

if TYPE_CHECKING:
    import torch

    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings

INT8_IR = "model.int8.xml"
# OpenVINO's name for what the CPU must offer for each precision (OPTIMIZATION_CAPABILITIES).
CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16", "int8": "INT8"}


class OpenVinoSettings(PluginSettings):
    kind: Literal["openvino"] = "openvino"
    precision: Literal["f32", "bf16", "f16", "int8"] = Field(
        "f32", description="f32 (the torch reference's scores) | bf16 | f16 (where the CPU has them; scores move "
                           "~1 %) | int8 (model.int8.xml from python -m calibration.quantize --runtime openvino)")
    hint: Literal["latency", "throughput"] = Field("latency", description="OpenVINO performance hint: latency "
                                                                          "(one frame at a time) | throughput")
    streams: int = Field(0, ge=0, description="inference streams; 0 = what the hint chooses")


class OpenVinoBackend:
    uses_torch_threads = False

    def __init__(self, bundle: "Bundle", settings: OpenVinoSettings, threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("the openvino Python package is not installed (pip install openvino)") from None
        import torch

        self.device = torch.device("cpu")
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if CAPABILITY[settings.precision] not in capabilities:
            raise BackendError(f"openvino precision {settings.precision}: this CPU offers {capabilities}")
        path = bundle.path / INT8_IR if settings.precision == "int8" else bundle.onnx_path
        if not path.is_file():
            raise BackendError(f"{path}: bundle has no such graph" + (
                " (python -m calibration.quantize --runtime openvino writes it)" if settings.precision == "int8" else ""))
        model = core.read_model(str(path))
        bind_statistics(model, bundle)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "f32" if settings.precision == "int8" else settings.precision,
            "PERFORMANCE_HINT": settings.hint.upper()}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if settings.streams:
            config["NUM_STREAMS"] = settings.streams
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.name = "openvino" if settings.precision == "f32" else f"openvino-{settings.precision}"
        self.detail = (f"{settings.precision}, {settings.hint}, {self.compiled.get_property('NUM_STREAMS')} stream(s), "
                       f"{self.compiled.get_property('INFERENCE_NUM_THREADS')} threads")

    def run(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        import numpy as np
        import torch

        # The request's output buffers are reused by the next call: the results are copied out.
        out = self.request.infer({0: np.ascontiguousarray(x.cpu().numpy())}, share_inputs=True)
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])


def bind_statistics(model: Any, bundle: "Bundle") -> None:
    """Replace the model's statistic inputs (every input after the first) by constants of the bundle's values."""
    import openvino as ov

    params = model.get_parameters()[1:]
    stats = statistics(bundle, [p.get_friendly_name() for p in params])
    for param in params:
        constant = ov.opset13.constant(stats[param.get_friendly_name()])
        for target in param.output(0).get_target_inputs():
            target.replace_source_output(constant.output(0))
        model.remove_parameter(param)


def start(bundle: "Bundle", settings: OpenVinoSettings, runtime: "RuntimeSettings") -> tuple[OpenVinoBackend, str]:
    backend = OpenVinoBackend(bundle, settings, runtime.threads)
    return backend, backend.detail


PLUGINS = [Plugin("openvino", OpenVinoSettings, lambda: importlib.import_module(__name__),
                  "OpenVINO on the CPU: f32, bf16/f16 where the CPU has them, or the NNCF INT8 graph")]
