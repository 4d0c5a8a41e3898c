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
    """features (B, D, h, w) -> distance map (B, h, w), every position of the whole batch in one bmm.

    ``factor="inverse"`` scores ``d^T S^-1 d`` with the inverse covariance; ``"cholesky"``
    stores the lower factor L of ``S^-1 = L L^T`` and scores ``||L^T d||^2``: the same size and
    work, but the projected values are whitened (order 1), which keeps FP16 storage and FP16
    matrix products accurate, and the distance is a sum of squares (never negative).

    ``half`` stores the matrices in FP16, halving the memory traffic that dominates this head.
    On CUDA the product runs in FP16 (tensor cores, FP32 accumulation inside cuBLAS); on the
    CPU, where FP16 products are slow, positions are upcast to FP32 in chunks of about
    ``chunk_bytes`` that stay in cache. Sums of squares are always taken in FP32.
    """

    def __init__(self, mean: torch.Tensor, inv_cov: torch.Tensor, half: bool = False,
                 factor: str = "inverse", chunk_bytes: int = 2 << 20) -> None:
        super().__init__()
        if factor not in ("inverse", "cholesky"):
            raise ValueError(f"Mahalanobis factor must be 'inverse' or 'cholesky', got {factor!r}")
        matrix = inv_cov.float()
        if factor == "cholesky":
            # FP64 factorisation once at start-up; the regularised inverse is positive definite.
            matrix = torch.linalg.cholesky(inv_cov.double()).float()
        self.factor = factor
        self.chunk_bytes = int(chunk_bytes)
        self.register_buffer("mean", mean.float())
        # Named for what it holds: "inv_cov" is also the bundle's tensor name (the score graph takes it as input).
        self.matrix_name = "inv_cov" if factor == "inverse" else "cholesky"
        self.register_buffer(self.matrix_name, matrix.half() if half else matrix)

    @property
    def matrix(self) -> torch.Tensor:
        return getattr(self, self.matrix_name)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        x = features.flatten(2).permute(2, 0, 1).float()  # (P, B, D)
        # Contiguous (P, B, D): a strided batch operand sends bmm down a slow per-matrix path.
        diff = (x - self.mean[:, None, :]).contiguous()
        p, _, d = diff.shape
        compute = self.matrix.dtype if self.matrix.is_cuda else torch.float32
        if compute == self.matrix.dtype:
            # One product over all positions (no slicing: a sliced matrix is a copy in an exported graph).
            return self._distance(diff, torch.bmm(diff.to(compute), self.matrix).float(), b, h, w)
        # FP16 storage on the CPU: positions upcast to FP32 in chunks that stay in cache.
        step = max(1, self.chunk_bytes // (4 * d * d))
        proj = torch.cat([torch.bmm(diff[s:s + step], self.matrix[s:s + step].float()) for s in range(0, p, step)])
        return self._distance(diff, proj, b, h, w)

    def _distance(self, diff: torch.Tensor, proj: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        dist = proj.square().sum(-1) if self.factor == "cholesky" else (proj * diff).sum(-1)
        return dist.clamp_min(0).sqrt().t().reshape(b, h, w)
