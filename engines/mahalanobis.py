"""Mahalanobis head (PaDiM): per-position Gaussian statistics, fitted by streaming sums.

Scoring a batch is a few batched matrix products over the Cholesky factors of the inverse
covariances, which are the memory traffic at small batches.
"""
from __future__ import annotations

import torch

from engines.threads import torch_threads


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
        with torch_threads(1):  # engines/threads.py: faster, and immune to MKL's threaded LU failing
            inv_cov = torch.linalg.inv(cov)
        return mean.float(), inv_cov.float()


# Columns per block of the Cholesky factor. Measured on the head alone in OpenVINO on a 2-core CPU
# (150 channels, 32x32 positions): 1.65 ms at batch 1 and 4.0-4.5 ms at batch 8 with blocks of
# 64, against 2.3-3.9 and 7.8-8.4 ms for the full inverse; blocks of 32-50 were as fast at
# batch 1 but slower at batch 8.
BLOCK = 64


def cholesky_blocks(inv_cov: torch.Tensor, width: int = BLOCK) -> dict[str, torch.Tensor]:
    """The lower Cholesky factor L of each position's inverse covariance (``inv_cov = L L^T``), as
    column blocks without the zeros above the diagonal: ``chol_k = L[:, s:, s:s + width]`` with
    s = k * width, (P, D - s, width). Factorised in FP64, stored as float32."""
    with torch_threads(1):  # as in GaussianAccumulator.finish
        factor = torch.linalg.cholesky(inv_cov.double())
    d = factor.shape[-1]
    return {f"chol_{k}": factor[:, s:, s:s + width].float().contiguous() for k, s in enumerate(range(0, d, width))}


def ordered_blocks(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The ``chol_k`` tensors among ``tensors`` (a bundle's head tensors, say), in block order."""
    return sorted(((n, t) for n, t in tensors.items() if n.startswith("chol_")), key=lambda nt: int(nt[0][5:]))


def inverse_from_blocks(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L L^T``, the inverse covariances (P, D, D), from the ``chol_k`` blocks of ``cholesky_blocks``."""
    blocks = ordered_blocks(tensors)
    p, d = blocks[0][1].shape[:2]
    factor = torch.zeros(p, d, d, dtype=torch.float64)
    for _, block in blocks:
        start = d - block.shape[1]
        factor[:, start:, start:start + block.shape[2]] = block.double()
    return (factor @ factor.transpose(1, 2)).float()


class MahalanobisHead(torch.nn.Module):
    """features (B, D, h, w) -> distance map (B, h, w), every position of the whole batch at once.

    The distance is ``||L^T d||^2`` with ``d`` the feature minus the position's mean and L the
    Cholesky factor of its inverse covariance, taken as column blocks (``cholesky_blocks``): block
    k multiplies only the channels from its own first column on, so the matrices read per call,
    the head's cost at batch 1, are (K + 1) / 2K of the full inverse (K blocks; 0.6 of it for
    150 channels in blocks of 64), and the distance is a sum of squares, never negative.
    """

    def __init__(self, mean: torch.Tensor, blocks: dict[str, torch.Tensor]) -> None:
        """``blocks``: the ``chol_k`` tensors (other entries, such as the mean, are ignored)."""
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.names, self.starts = [], []
        for name, block in ordered_blocks(blocks):
            self.names.append(name)
            self.starts.append(mean.shape[-1] - block.shape[1])
            self.register_buffer(name, block.float())

    @classmethod
    def from_inverse(cls, mean: torch.Tensor, inv_cov: torch.Tensor) -> "MahalanobisHead":
        return cls(mean, cholesky_blocks(inv_cov))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        x = features.flatten(2).permute(2, 0, 1).float()  # (P, B, D)
        # Contiguous (P, B, D): a strided batch operand sends bmm down a slow per-matrix path.
        diff = (x - self.mean[:, None, :]).contiguous()
        dist = sum(torch.bmm(diff[:, :, s:], getattr(self, name)).square().sum(-1)
                   for s, name in zip(self.starts, self.names))
        return dist.clamp_min(0).sqrt().t().reshape(b, h, w)
