"""Runtime backends as plugins, and the ``runtime:`` settings that choose one.

One file per backend in this package (onnxruntime, openvino, torch, tensorrt, and ``auto``,
which picks one), each with its own typed settings and a ``PLUGINS`` record; ``BACKENDS`` finds
them. Every backend runs the bundle's score graph (engines/score.py). The backend's heavy library
(torch, ONNX Runtime, OpenVINO, TensorRT) is imported when it is opened, not when its settings
are read.

``auto`` picks TensorRT where a plan for this GPU exists, else torch on CUDA, else the faster of
OpenVINO and ONNX Runtime for this bundle, timed at start-up; the choice and the reason are
returned for the start-up log.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from engines.plugins import Registry
from engines.runtimes.base import Backend, BackendError
from engines.settings import Settings

if TYPE_CHECKING:
    from engines.bundle import Bundle

__all__ = ["BACKENDS", "Backend", "BackendError", "RuntimeSettings", "open_backend"]

BACKENDS = Registry("engines.runtimes", "backend")


class RuntimeSettings(Settings):
    backend: BACKENDS.field("auto") = Field(  # type: ignore[valid-type]
        default_factory=BACKENDS.default_settings("auto"),
        description="the backend: a name, or kind: and that backend's own keys; auto: TensorRT plan > torch "
                    "CUDA > the faster of OpenVINO and ONNX Runtime on the CPU (timed at start-up)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = all cores")
    fallback: bool = Field(True, description="if the chosen backend cannot start, fall back to the next one")
    batch_size: int = Field(8, ge=1, description="tiles scored per engine call (tiles of one or more frames)")
    map_max_side: int = Field(1024, ge=64, description="score maps, regions and heatmaps of larger frames are "
                                                       "computed at most this long; boxes are scaled to frame pixels")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
        return v


def open_backend(bundle: "Bundle", runtime: RuntimeSettings | None = None) -> tuple[Backend, str]:
    """Start the backend ``runtime`` names (or the next that can, with ``fallback``); returns it and a
    one-line reason for the choice."""
    runtime = runtime or RuntimeSettings()
    chosen = runtime.backend.kind
    order = [chosen] + ([k for k in ("onnxruntime",) if k != chosen] if runtime.fallback and chosen != "auto" else [])
    errors = []
    for kind in order:
        settings = runtime.backend if kind == chosen else BACKENDS.get(kind).settings()
        try:
            backend, why = BACKENDS.load(kind).start(bundle, settings, runtime)
        except BackendError as e:
            errors.append(f"{kind}: {e}")
            continue
        reason = f"backend={chosen} -> {backend.name}" + (f" ({why})" if why else "")
        return backend, reason + (" after: " + "; ".join(errors) if errors else "")
    raise BackendError("no backend could start: " + "; ".join(errors))
