"""Mahalanobis head (PaDiM): per-position Gaussian statistics, fitted by streaming sums.

Scoring a batch is one batched matrix product over the inverse covariances, which are the
memory traffic; they can be held in FP16 on the device (accumulation stays in FP32).
"""
from __future__ import annotations

import torch


class GaussianAccumulator:
    """Running sums for per-position mean and covariance; never holds the embeddings."""

    def __init__(self, positions: int, dim: int) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(positions, dim, dtype=torch.float64)
        self.outer = torch.zeros(positions, dim, dim, dtype=torch.float64)

    def add(self, emb: torch.Tensor) -> None:
        """emb: (B, D, P) float embeddings of B good images (or tiles) at P positions."""
        e = emb.detach().float().permute(2, 0, 1)  # (P, B, D)
        if self.shift is None:
            # Sums of shifted values keep FP32 products accurate (no cancellation against a
            # large mean), so the per-batch work stays in fast FP32 and only the totals are FP64.
            self.shift = e.mean(dim=1, keepdim=True)
        e = (e - self.shift).contiguous()
        self.n += e.shape[1]
        self.sum += e.sum(dim=1).double()
        self.outer += torch.bmm(e.transpose(1, 2), e).double()

    def finish(self, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (P, D) and regularised inverse covariance (P, D, D), both float32."""
        if self.n < 2:
            raise ValueError(f"PaDiM needs at least 2 training samples, got {self.n}")
        centred = self.sum / self.n
        cov = (self.outer - self.n * centred[:, :, None] * centred[:, None, :]) / (self.n - 1)
        cov += reg * torch.eye(cov.shape[-1], dtype=cov.dtype)
        mean = centred + self.shift[:, 0].double()
        return mean.float(), torch.linalg.inv(cov).float()


class MahalanobisHead(torch.nn.Module):
    """features (B, C, h, w) -> distance map (B, h, w)."""

    def __init__(self, mean: torch.Tensor, inv_cov: torch.Tensor, channels: torch.Tensor, half: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_cov", inv_cov.half() if half else inv_cov)
        self.register_buffer("channels", channels.long())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        x = features.index_select(1, self.channels).flatten(2).permute(2, 0, 1).float()  # (P, B, D)
        diff = x - self.mean[:, None, :]
        proj = torch.bmm(diff, self.inv_cov.float() if self.inv_cov.dtype != torch.float32 else self.inv_cov)
        dist = (proj * diff).sum(-1).clamp_min(0).sqrt()  # (P, B)
        return dist.t().reshape(b, h, w)
