"""Backend choice: ``auto`` picks TensorRT where a plan for this GPU exists, else torch on CUDA,
else ONNX Runtime on the CPU. The choice and the reason are returned for the start-up log."""
from __future__ import annotations

import logging

import torch

from engines.bundle import Bundle
from engines.runtimes.base import Backend, BackendError

log = logging.getLogger(__name__)


def open_backend(bundle: Bundle, backend: str = "auto", device: str = "auto", threads: int = 0,
                 fallback: bool = True) -> tuple[Backend, str]:
    """Start a backend; returns it with a one-line reason for the choice."""
    cuda = torch.cuda.is_available() and device != "cpu"
    order = {"auto": ["tensorrt", "torch-cuda", "onnxruntime"] if cuda else ["onnxruntime"],
             "tensorrt": ["tensorrt"], "torch": ["torch-cuda" if cuda else "torch-cpu"],
             "onnxruntime": ["onnxruntime"]}[backend]
    if fallback and backend != "auto":
        order += [b for b in (["torch-cuda"] if cuda else []) + ["onnxruntime"] if b not in order]
    errors = []
    for name in order:
        try:
            return _start(name, bundle, device, threads), _reason(backend, name, errors, cuda)
        except BackendError as e:
            errors.append(f"{name}: {e}")
            log.warning("backend %s unavailable: %s", name, e)
    raise BackendError("no backend could start: " + "; ".join(errors))


def _start(name: str, bundle: Bundle, device: str, threads: int) -> Backend:
    if threads:
        torch.set_num_threads(threads)
    if name == "tensorrt":
        from engines.runtimes.tensorrt_backend import TensorRTBackend, TensorRTBackendConfig

        return TensorRTBackend(bundle, TensorRTBackendConfig(device="cuda" if device == "auto" else device))
    if name in ("torch-cuda", "torch-cpu"):
        from engines.runtimes.torch_backend import TorchBackend, TorchBackendConfig

        dev = "cpu" if name == "torch-cpu" else ("cuda" if device == "auto" else device)
        return TorchBackend(bundle, TorchBackendConfig(device=dev))
    from engines.runtimes.onnxruntime_backend import OrtBackend, OrtBackendConfig

    return OrtBackend(bundle, OrtBackendConfig(threads=threads))


def _reason(asked: str, chosen: str, errors: list[str], cuda: bool) -> str:
    why = f"backend={asked} -> {chosen}"
    if asked == "auto" and not cuda:
        why += " (no CUDA device)"
    if errors:
        why += " after: " + "; ".join(errors)
    return why
