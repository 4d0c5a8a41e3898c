"""``auto``: the fastest backend this machine can run for the bundle.

With a CUDA device: a TensorRT plan built for this GPU, else torch on CUDA, else the CPU choice.
On the CPU: OpenVINO and ONNX Runtime both start, each scores the same few batches of the
runtime's batch size, and the faster is kept (measured once, at start-up, for this bundle on this
machine: which wins depends on the method, the batch and the CPU). Each with its own default
settings (name a backend to set its options). The choice, the times and why go to the start-up log.
"""
from __future__ import annotations

import importlib
import statistics
import time
from typing import TYPE_CHECKING, Literal

from engines.plugins import Plugin, PluginSettings
from engines.runtimes.base import Backend, BackendError

if TYPE_CHECKING:
    from engines.bundle import Bundle
    from engines.runtimes import RuntimeSettings

CPU_CHOICES = ("openvino", "onnxruntime")
TIMED_CALLS = 3


class AutoSettings(PluginSettings):
    kind: Literal["auto"] = "auto"


def start(bundle: "Bundle", settings: AutoSettings, runtime: "RuntimeSettings") -> tuple[Backend, str]:
    skipped: list[str] = []
    if runtime.device != "cpu" and _cuda_available():
        for kind in ("tensorrt", "torch"):
            try:
                backend, why = _start(kind, bundle, runtime)
                return backend, "; ".join([why] + skipped)
            except BackendError as e:
                skipped.append(f"{kind}: {e}")
    else:
        skipped.append("no CUDA device")
    started: dict[str, Backend] = {}
    for kind in CPU_CHOICES:
        try:
            started[kind] = _start(kind, bundle, runtime)[0]
        except BackendError as e:
            skipped.append(f"{kind}: {e}")
    if not started:
        raise BackendError("; ".join(skipped))
    if len(started) == 1:
        return next(iter(started.values())), "; ".join(skipped)
    times = {kind: time_backend(backend, bundle, runtime) for kind, backend in started.items()}
    best = min(times, key=times.__getitem__)
    measured = ", ".join(f"{k} {ms:.1f} ms" for k, ms in times.items())
    return started[best], "; ".join([f"faster on this CPU for this bundle ({measured} per batch)"] + skipped)


def time_backend(backend: Backend, bundle: "Bundle", runtime: "RuntimeSettings") -> float:
    """Median ms of a few calls on a batch the pipeline would send (after one untimed call)."""
    import numpy as np
    import torch

    from engines.tiling import make_grid

    m = bundle.manifest
    batch = len(make_grid(tuple(m.frame_size), m.input_hw, m.model.tiling)) if m.model.per_position \
        else runtime.batch_size
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, *m.input_hw, 3), dtype=np.uint8))
    backend.run(x)
    times = []
    for _ in range(TIMED_CALLS):
        t = time.perf_counter()
        backend.run(x)
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def _start(kind: str, bundle: "Bundle", runtime: "RuntimeSettings") -> tuple[Backend, str]:
    from engines.runtimes import BACKENDS

    return BACKENDS.load(kind).start(bundle, BACKENDS.get(kind).settings(), runtime)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


PLUGINS = [Plugin("auto", AutoSettings, lambda: importlib.import_module(__name__),
                  "TensorRT plan > torch CUDA > the faster of OpenVINO and ONNX Runtime on the CPU, measured at start")]
