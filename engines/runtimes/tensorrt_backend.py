"""TensorRT runtime: a plan of the bundle's score graph from ``BUNDLE/plans``, executed on torch's
CUDA context and stream.

torch owns everything on the device: the context (torch initialises CUDA first), the memory
(inputs and outputs are torch CUDA tensors whose ``data_ptr`` is bound with
``set_tensor_address``) and the stream (``execute_async_v3`` on torch's current stream). The
head statistics are the plan's other inputs: uploaded and bound once at start-up, so the plan
stays valid across recalibrations that keep the network and the statistics' shapes.

Any reason the plan cannot run here (no ``tensorrt`` module, no CUDA device, no plan, a plan
built for another GPU, TensorRT version or ONNX) raises BackendError, so ``open_backend``
falls back to the next backend. Unverified in the workplace it was written in: TensorRT
cannot be installed there (see docs/engines.md).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from engines.plan import PlanManifest, PlanMismatch, find_plan
from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import BackendError, statistics

if TYPE_CHECKING:
    import torch

    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings


class TensorRTSettings(PluginSettings):
    kind: Literal["tensorrt"] = "tensorrt"
    precision: Literal["fp32", "fp16", "int8"] | None = Field(
        None, description="use a plan of this precision; null = the newest plan built for this GPU")
    cuda_graphs: list[int] = Field(default_factory=list, description="batch sizes captured as CUDA graphs at "
                                                                     "start-up")


def profile_batch_ok(manifest: PlanManifest, batch: int) -> None:
    """A batch the plan's optimisation profile cannot take is refused with the plan's range."""
    lo, hi = int(manifest.profile["min"][0]), int(manifest.profile["max"][0])
    if not lo <= batch <= hi:
        raise ValueError(f"batch {batch} is outside the TensorRT plan's profile {lo}..{hi}; "
                         f"lower runtime.batch_size or rebuild with build-engine --batch {batch}")


class TensorRTBackend:
    uses_torch_threads = False
    name = "tensorrt"

    def __init__(self, bundle: "Bundle", settings: TensorRTSettings, device: str = "cuda") -> None:
        import torch

        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError("the tensorrt Python module is not installed") from None
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendError("TensorRT needs a CUDA device and torch sees none")
        torch.cuda.init()  # torch's primary context first: TensorRT then uses it
        with torch.cuda.device(self.device):
            dev = torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(dev)
            gpu, cc = torch.cuda.get_device_name(dev), f"{major}.{minor}"
        try:
            plan_path, self.manifest = find_plan(bundle, trt.__version__, gpu, cc, settings.precision)
        except (FileNotFoundError, PlanMismatch) as e:
            raise BackendError(str(e)) from None
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan_path}: TensorRT could not deserialise the plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.inputs = sorted(inputs, key=lambda n: n != "input")  # the tiles, then the head statistics
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.outputs) != ["map", "score"]:
            raise BackendError(f"{plan_path}: expected the score graph's two outputs (map, score), plan has "
                               f"{self.outputs}; rebuild with build-engine")
        self.outputs = ["map", "score"]
        if "input" not in inputs:
            raise BackendError(f"{plan_path}: expected an input named 'input' (the tiles), plan has {inputs}")
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.inputs[0]))
        self.out_dtypes = [_torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in self.outputs]
        # Bound once: the addresses stay valid for every later execution of this context.
        self.stats = {n: torch.from_numpy(a).to(self.device) for n, a in statistics(bundle, self.inputs[1:]).items()}
        for name, tensor in self.stats.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.graphs: dict[int, tuple[Any, torch.Tensor, list[torch.Tensor]]] = {}
        for b in settings.cuda_graphs:
            self.graphs[b] = self._capture(b)

    def _bind(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """Set the tiles' shape and bind them and freshly allocated output tensors by address."""
        self.context.set_input_shape(self.inputs[0], tuple(x.shape))
        self.context.set_tensor_address(self.inputs[0], x.data_ptr())
        outs = []
        for name, dtype in zip(self.outputs, self.out_dtypes):
            shape = tuple(self.context.get_tensor_shape(name))
            out = _torch().empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        return outs

    def _execute(self) -> None:
        stream = _torch().cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _capture(self, batch: int) -> tuple[Any, "torch.Tensor", list["torch.Tensor"]]:
        torch = _torch()
        profile_batch_ok(self.manifest, batch)
        h, w = self.manifest.input_hw
        static_in = torch.zeros(batch, h, w, 3, dtype=self.input_dtype, device=self.device)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            static_out = self._bind(static_in)
            self._execute()  # the first run does TensorRT's lazy set-up outside the graph
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._execute()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph, static_in, static_out

    def run(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        with _torch().inference_mode():
            maps, scores = self._run(x)
            return maps, scores

    def _run(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        torch = _torch()
        profile_batch_ok(self.manifest, x.shape[0])
        x = x.to(self.device, self.input_dtype).contiguous()
        captured = self.graphs.get(x.shape[0])
        if captured is not None:
            graph, static_in, static_out = captured
            static_in.copy_(x)
            graph.replay()
            return [o.float().clone() if o.dtype == torch.float32 else o.float() for o in static_out]
        outs = self._bind(x)
        self._execute()
        return [o.float() for o in outs]


def _torch_dtype(trt: Any, dtype: Any) -> "torch.dtype":
    torch = _torch()
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.uint8: torch.uint8}
    if dtype not in table:
        raise BackendError(f"TensorRT tensor type {dtype} is not supported by this backend")
    return table[dtype]


def _torch() -> Any:
    import torch

    return torch


def start(bundle: "Bundle", settings: TensorRTSettings, runtime: "RuntimeSettings") -> tuple[TensorRTBackend, str]:
    device = "cuda" if runtime.device in ("auto", "cpu") else runtime.device
    backend = TensorRTBackend(bundle, settings, device)
    return backend, f"plan {backend.manifest.precision} built for {backend.manifest.gpu_name}"


PLUGINS = [Plugin("tensorrt", TensorRTSettings, lambda: importlib.import_module(__name__),
                  "a TensorRT 10 plan built by build-engine for this GPU (unverified here)")]
