"""The torch runtime: the reference, on the CPU or a CUDA device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.bundle import Bundle
from engines.network import build_network
from engines.runtimes.base import BackendError


@dataclass
class TorchBackendConfig:
    device: str = "cpu"
    half: bool = False           # FP16 weights and activations (CUDA only)
    channels_last: bool = False


class TorchBackend:
    name = "torch"

    def __init__(self, bundle: Bundle, cfg: TorchBackendConfig) -> None:
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA requested but torch sees no CUDA device")
        self.cfg = cfg
        self.net = build_network(bundle.manifest.network, bundle.network_state()).to(self.device)
        if cfg.half:
            self.net = self.net.half()
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.cfg.half:
            x = x.half()
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        return [o.float() for o in out]
