"""The one interface every runtime backend implements (one small file per runtime)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engines.bundle import Bundle


class BackendError(RuntimeError):
    """A backend cannot start here (missing library, no device, plan mismatch)."""


class Backend(Protocol):
    name: str
    device: "torch.device"
    # True where the backend computes with torch's own CPU threads (the torch backend); False where
    # it has a thread pool of its own (ONNX Runtime, OpenVINO) or works on a GPU. The pipeline's
    # host work beside a pool of its own runs on one torch thread (engines/pipeline.py says why).
    uses_torch_threads: bool

    def run(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """A batch of uint8 (B, H, W, 3) BGR tiles (on any device) -> the score graph's (maps (B, H, W),
        scores (B,)), float32, on ``device`` (engines/score.py)."""
        ...


def statistics(bundle: "Bundle", names: list[str]) -> dict[str, "np.ndarray"]:
    """The head statistics the exported score graph takes as inputs, as float32 arrays: bound once when
    a runtime starts, never per frame."""
    import numpy as np

    tensors = bundle.head_tensors()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise BackendError(f"{bundle.onnx_path}: the graph takes {missing}, which {bundle.path / 'head.safetensors'} "
                           f"does not hold; recalibrate (model {bundle.manifest.model_id})")
    return {n: np.ascontiguousarray(tensors[n].float().numpy()) for n in names}
