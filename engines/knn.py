"""Device-side kNN scoring head: nearest-neighbour distances to a memory bank, and its coreset.

Search runs on whatever device the bank lives on (same code on CPU and CUDA) in bounded
memory: queries and bank are walked in chunks, each chunk's squared distances come from
one matrix product ``||q||^2 - 2 q.b + ||b||^2`` (clamped at 0), and a running top-k is
merged across bank chunks; no N x M matrix is ever built. The bank's squared norms are
computed once, when the index is built.

Working-set bound. For a query chunk of ``nq`` rows and a bank chunk of ``nb`` rows,
dimension ``D`` and ``k`` neighbours, the temporaries of one step are at most

    c * nq * nb                      distance block (c = 4 bytes on CPU; 8 on CUDA, where
                                     the top-k radix select keeps scratch of its own)
    + 4 * nb * D   if bank is fp16   the bank chunk upcast to fp32
    + 4 * nq * D   if queries are not fp32
    + nq * (48 * k + 8)              query norms, running top-k, chunk top-k, their merge

and `KnnIndex` picks ``nq`` and ``nb`` so that this stays <= ``max_bytes``. Nothing else
scales with the bank: a 1,000,000 x 256 bank is searched within ``max_bytes`` plus the bank
itself (1 GB in fp32, 0.5 GB in fp16), its norms (4 MB) and the (N, k) result. BLAS packing
buffers live outside torch's allocator and are not part of the bound.

Precision: the expansion cancels for near-identical vectors, so a distance near 0 carries an
absolute error of about ``||q|| * sqrt(eps_fp32)`` (3e-4 ||q||); the error of a squared
distance is about ``||q||^2 * eps``, so larger distances are relatively more exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm import tqdm

# Temporaries of one search step of a head stay under this (see the bound above).
SEARCH_BYTES = 128 * 2**20
# Patch features held while fitting (fp16), before the coreset: 1 GiB is ~2.3 M patches of 232
# channels, i.e. ~2,200 images at 256 px with stride-8 taps.
MAX_BANK_BYTES = 2**30
# Query chunks beyond this add little to matmul efficiency but eat the bank chunk's share.
_MAX_QUERY_CHUNK = 4096
# Below this many bank rows per chunk, halving the query chunk is the better trade.
_MIN_BANK_CHUNK = 1024


class KnnIndex:
    """A memory bank (M, D) with its squared norms, searched for k nearest neighbours.

    ``storage_dtype=torch.float16`` halves the bank's memory; distances are still
    accumulated in fp32 (each bank chunk is upcast before its matrix product).
    """

    def __init__(self, bank: Tensor, max_bytes: int = 256 * 2**20,
                 storage_dtype: torch.dtype = torch.float32) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
        if storage_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"storage_dtype must be float32 or float16, got {storage_dtype}")
        self.bank = bank.detach().to(storage_dtype).contiguous()
        self.max_bytes = int(max_bytes)
        # Norms of the stored (possibly fp16-rounded) rows, consistent with what q.b sees.
        self.sq_norms = torch.empty(bank.shape[0], dtype=torch.float32, device=bank.device)
        rows = max(1, self.max_bytes // (4 * bank.shape[1] + 4))
        for start in range(0, bank.shape[0], rows):
            self.sq_norms[start:start + rows] = self.bank[start:start + rows].float().square().sum(1)

    def __len__(self) -> int:
        return self.bank.shape[0]

    @property
    def device(self) -> torch.device:
        return self.bank.device

    def working_bytes(self, nq: int, nb: int, k: int, queries_fp32: bool = True) -> int:
        """Upper bound on temporary bytes of one search step (see the module docstring)."""
        d = self.bank.shape[1]
        per_pair = 8 if self.device.type == "cuda" else 4
        upcast_bank = 4 * nb * d if self.bank.dtype != torch.float32 else 0
        upcast_queries = 0 if queries_fp32 else 4 * nq * d
        return per_pair * nq * nb + upcast_bank + upcast_queries + nq * (48 * k + 8)

    def plan(self, n: int, k: int, queries_fp32: bool = True) -> tuple[int, int]:
        """Query and bank chunk sizes whose working set fits ``max_bytes``."""
        m = len(self)
        nq = max(1, min(n, _MAX_QUERY_CHUNK))
        while True:
            fixed = self.working_bytes(nq, 0, k, queries_fp32)
            per_bank_row = self.working_bytes(nq, 1, k, queries_fp32) - fixed
            nb = (self.max_bytes - fixed) // per_bank_row
            if nb >= min(m, _MIN_BANK_CHUNK) or nq == 1:
                break
            nq //= 2
        if nb < 1:
            raise ValueError(f"max_bytes={self.max_bytes} is too small for one query against one bank row "
                             f"(needs {self.working_bytes(1, 1, k, queries_fp32)} bytes)")
        return nq, min(nb, m)

    @torch.no_grad()
    def search(self, queries: Tensor, k: int = 1) -> Tensor:
        """Euclidean distances (N, k) of each query row to its k nearest bank rows, ascending."""
        if queries.ndim != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (N, {self.bank.shape[1]}), got shape {tuple(queries.shape)}")
        if queries.device != self.device:
            raise ValueError(f"queries are on {queries.device} but the memory bank is on {self.device}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (bank size), got {k}")
        queries_fp32 = queries.dtype == torch.float32
        nq, nb = self.plan(queries.shape[0], k, queries_fp32)
        out = torch.empty(queries.shape[0], k, dtype=torch.float32, device=self.device)
        for qs in range(0, queries.shape[0], nq):
            q = queries[qs:qs + nq].float()
            out[qs:qs + nq] = self._search_chunk(q, k, nb)
        return out.sqrt_()

    def _search_chunk(self, q: Tensor, k: int, nb: int) -> Tensor:
        """Squared distances (nq, k) of one query chunk, merged over all bank chunks."""
        q_sq = q.square().sum(1, keepdim=True)
        best = torch.full((q.shape[0], k), math.inf, dtype=torch.float32, device=q.device)
        for bs in range(0, len(self), nb):
            b = self.bank[bs:bs + nb].float()
            d = torch.addmm(self.sq_norms[bs:bs + nb], q, b.T, alpha=-2.0)
            d.add_(q_sq).clamp_min_(0.0)
            chunk_best = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            del d, b  # free the block before the merge allocates
            best = torch.cat((best, chunk_best), dim=1).topk(k, dim=1, largest=False).values
        return best


def patches(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B * h * w, C) float32 rows, one per patch."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()


def sq_distances(q: Tensor, rows: Tensor) -> Tensor:
    """Squared distances (B, R) of each query (B, D) to each of its own rows (B, R, D)."""
    return (rows.float() - q[:, None, :]).square().sum(-1)


def knn_distances(queries: Tensor, bank: Tensor, k: int = 1, max_bytes: int = 256 * 2**20) -> Tensor:
    """One-off search; build a `KnnIndex` instead when the bank serves many queries."""
    return KnnIndex(bank, max_bytes).search(queries, k)


@torch.no_grad()
def greedy_coreset(features: Tensor, ratio: float, projection_dim: int = 128, seed: int = 0,
                   progress: bool = True) -> Tensor:
    """PatchCore's greedy k-center coreset: indices (int64, selection order) of ``ratio * M`` rows.

    Runs on ``features``' device. Distances are taken after a Johnson-Lindenstrauss Gaussian
    projection to ``projection_dim`` (skipped when D is already that small). The projection and
    the first centre come from ``seed`` through a CPU generator, so the result does not depend on
    the device's random stream. Any prefix of the result is itself a greedy coreset.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (M, D) matrix, got shape {tuple(features.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    m, d = features.shape
    n_select = max(1, round(ratio * m))
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if d > projection_dim:
        projection = torch.randn(d, projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x @ projection.to(features.device)
    sq_norms = x.square().sum(1)
    selected = torch.empty(n_select, dtype=torch.int64, device=features.device)
    selected[0] = int(torch.randint(m, (1,), generator=generator))
    min_sq = torch.full((m,), math.inf, device=features.device)
    for i in tqdm(range(1, n_select), desc="coreset", disable=not progress, unit="pt"):
        newest = selected[i - 1:i]  # stays a device tensor: no host sync per step
        # Squared distance to the newest centre; the argmax is the same as for the distance.
        centre = x.index_select(0, newest).squeeze(0)
        to_newest = torch.addmv(sq_norms, x, centre, alpha=-2.0).add_(sq_norms.index_select(0, newest))
        torch.minimum(min_sq, to_newest, out=min_sq)
        # -inf, not 0: rounding must never let a chosen point (or its duplicate) win again.
        min_sq.index_fill_(0, newest, -math.inf)
        selected[i] = torch.argmax(min_sq)
    return selected
