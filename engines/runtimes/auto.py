"""``auto``: the fastest backend this machine can run for the bundle.

TensorRT where a plan for this GPU exists, else torch on CUDA, else ONNX Runtime on the CPU,
each with its own default settings (name a backend to set its options). The choice and why
go to the start-up log.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal

from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import Backend, BackendError

if TYPE_CHECKING:
    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings


class AutoSettings(PluginSettings):
    kind: Literal["auto"] = "auto"


def start(bundle: "Bundle", settings: AutoSettings, runtime: "RuntimeSettings") -> tuple[Backend, str]:
    from engines.runtimes import BACKENDS

    cuda = runtime.device != "cpu" and _cuda_available()
    order = ["tensorrt", "torch", "onnxruntime"] if cuda else ["onnxruntime"]
    skipped = []
    for kind in order:
        try:
            backend, why = BACKENDS.load(kind).start(bundle, BACKENDS.get(kind).settings(), runtime)
        except BackendError as e:
            skipped.append(f"{kind}: {e}")
            continue
        reasons = ([why] if why else []) + ([] if cuda else ["no CUDA device"]) + skipped
        return backend, "; ".join(reasons)
    raise BackendError("; ".join(skipped))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


PLUGINS = [Plugin("auto", AutoSettings, lambda: importlib.import_module(__name__),
                  "TensorRT plan > torch CUDA > ONNX Runtime CPU, whichever runs here first")]
