"""The one interface every runtime backend implements (one small file per runtime)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class BackendError(RuntimeError):
    """A backend cannot start here (missing library, no device, plan mismatch)."""


class Backend(Protocol):
    name: str
    device: "torch.device"

    def run(self, x: "torch.Tensor") -> list["torch.Tensor"]:
        """A batch of uint8 (B, H, W, 3) BGR tiles (on any device) -> the engine graph's outputs, float32,
        on ``device``."""
        ...
