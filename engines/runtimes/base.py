"""The one interface every runtime backend implements (one small file per runtime)."""
from __future__ import annotations

from typing import Protocol

import torch


class BackendError(RuntimeError):
    """A backend cannot start here (missing library, no device, plan mismatch)."""


class Backend(Protocol):
    name: str
    device: torch.device

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised input batch (B, 3, H, W) float32 on ``device`` -> engine outputs on ``device``."""
        ...
