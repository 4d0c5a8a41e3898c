"""kNN head: exact distances in bounded memory, CPU/CUDA agreement, greedy coreset coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from engines.knn import KnnIndex, greedy_coreset, knn_distances

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")


def reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    # Direct differences, not the matrix-product expansion under test.
    distances = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return distances.topk(k, dim=1, largest=False).values.float()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(300, 32, generator=generator), torch.randn(2000, 32, generator=generator)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("max_bytes,chunks_queries,chunks_bank", [
    (2**30, False, False),  # everything in one block
    (2**20, True, True),
    (2**17, True, True),    # a few queries at a time
    (700, True, True),      # one query against ~150 bank rows at a time
])
def test_matches_cdist_topk(data, k: int, max_bytes: int, chunks_queries: bool, chunks_bank: bool) -> None:
    queries, bank = data
    index = KnnIndex(bank, max_bytes)
    nq, nb = index.plan(len(queries), k)
    assert (nq < len(queries), nb < len(bank)) == (chunks_queries, chunks_bank)
    assert index.working_bytes(nq, nb, k) <= max_bytes
    got = index.search(queries, k)
    assert got.shape == (len(queries), k)
    torch.testing.assert_close(got, reference(queries, bank, k), rtol=1e-4, atol=1e-4)


def test_bank_chunks_smaller_than_k_still_merge_correctly(data) -> None:
    queries, bank = data[0][:20], data[1][:100]
    index = KnnIndex(bank, max_bytes=260)
    assert index.plan(len(queries), 5)[1] < 5
    torch.testing.assert_close(index.search(queries, 5), reference(queries, bank, 5), rtol=1e-4, atol=1e-4)


def test_queries_on_the_bank_give_zero_not_nan(data) -> None:
    bank = data[1] * 10  # large norms make the expansion's cancellation worst
    got = knn_distances(bank[:50], bank, k=1, max_bytes=2**16)
    assert torch.isfinite(got).all() and (got >= 0).all()
    # float32 rounding of ||q||^2 - 2 q.b + ||b||^2 leaves about ||q|| * sqrt(eps) after the sqrt.
    assert got.max() < 2e-3 * bank.norm(dim=1).max()


def test_fp16_storage_accumulates_in_fp32(data) -> None:
    queries, bank = data
    index = KnnIndex(bank, max_bytes=2**18, storage_dtype=torch.float16)
    assert index.bank.dtype == torch.float16
    expected = reference(queries, bank.half().float(), 3)
    torch.testing.assert_close(index.search(queries, 3), expected, rtol=1e-4, atol=1e-4)


def test_fp16_queries_are_upcast(data) -> None:
    queries, bank = data
    got = knn_distances(queries.half(), bank, k=2, max_bytes=2**18)
    torch.testing.assert_close(got, reference(queries.half().float(), bank, 2), rtol=1e-4, atol=1e-4)


def test_bad_arguments_name_the_problem(data) -> None:
    queries, bank = data
    index = KnnIndex(bank)
    with pytest.raises(ValueError, match=r"queries must be \(N, 32\), got shape \(300, 16\)"):
        index.search(queries[:, :16])
    with pytest.raises(ValueError, match=r"k must be in \[1, 2000\]"):
        index.search(queries, k=2001)
    with pytest.raises(ValueError, match="max_bytes=16 is too small"):
        KnnIndex(bank, max_bytes=16).search(queries)
    with pytest.raises(ValueError, match="non-empty"):
        KnnIndex(torch.empty(0, 32))


def cpu_peak_bytes(run, trace: Path) -> int:
    """Peak bytes held by tensors allocated inside ``run``, from the profiler's allocator events.

    The CPU allocator reports a running total of bytes allocated since profiling began to each
    [memory] event, so its maximum is the peak working set (tensors alive before, such as the
    bank, are not in it).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "profiler recorded no allocations"
    return max(totals)


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.float16])
def test_peak_memory_stays_within_max_bytes(tmp_path: Path, storage_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(200_000, 256, generator=generator)
    queries = torch.randn(100, 256, generator=generator)
    max_bytes, k = 4 * 2**20, 3
    index = KnnIndex(bank, max_bytes, storage_dtype=storage_dtype)
    del bank
    result: list[torch.Tensor] = []
    peak = cpu_peak_bytes(lambda: result.append(index.search(queries, k)), tmp_path / "trace.json")
    output_bytes = result[0].numel() * result[0].element_size()
    assert peak <= max_bytes + output_bytes
    # The measurement sees the distance blocks: an N x M matrix (160 MB) would be far above.
    assert peak > max_bytes // 2


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_cpu_within_bound() -> None:
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(200_000, 256, generator=generator)
    queries = torch.randn(500, 256, generator=generator)
    max_bytes, k = 4 * 2**20, 3
    on_cpu = KnnIndex(bank, max_bytes).search(queries, k)
    index = KnnIndex(bank.cuda(), max_bytes)
    cuda_queries = queries.cuda()
    index.search(cuda_queries[:8], k)  # cuBLAS workspace is allocated once, outside the bound
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    on_cuda = index.search(cuda_queries, k)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    assert peak <= max_bytes + on_cuda.numel() * 4
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
    # Rounding may flip near-ties of the greedy argmax, so compare coverage, not indices.
    points = clustered(0)
    coreset_cuda = greedy_coreset(points.cuda(), 0.02, projection_dim=16, progress=False).cpu()
    coreset_cpu = greedy_coreset(points, 0.02, projection_dim=16, progress=False)
    assert covering_radius(points, coreset_cuda) < 1.1 * covering_radius(points, coreset_cpu)


def clustered(seed: int) -> torch.Tensor:
    """Clusters of very different sizes, where a random subset misses the small ones."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [1500, 800, 400] + [5] * 20
    centres = torch.randn(len(sizes), 64, generator=generator) * 20
    return torch.cat([c + torch.randn(n, 64, generator=generator) for c, n in zip(centres, sizes)])


def covering_radius(points: torch.Tensor, subset: torch.Tensor) -> float:
    return float(torch.cdist(points, points[subset]).min(dim=1).values.max())


def test_coreset_covers_the_set_better_than_random() -> None:
    points = clustered(0)
    chosen = greedy_coreset(points, ratio=0.02, projection_dim=16, seed=0, progress=False)
    assert chosen.dtype == torch.int64 and len(chosen) == round(0.02 * len(points))
    assert len(chosen.unique()) == len(chosen)
    random_subset = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[: len(chosen)]
    assert covering_radius(points, chosen) < 0.5 * covering_radius(points, random_subset)


def test_coreset_is_deterministic_from_the_seed() -> None:
    points = clustered(1)
    first = greedy_coreset(points, ratio=0.05, seed=3, progress=False)
    assert torch.equal(first, greedy_coreset(points, ratio=0.05, seed=3, progress=False))
    assert not torch.equal(first, greedy_coreset(points, ratio=0.05, seed=4, progress=False))


def test_coreset_never_repeats_a_point_among_duplicates() -> None:
    points = torch.cat([torch.ones(50, 8), torch.zeros(50, 8)])
    chosen = greedy_coreset(points, ratio=0.5, progress=False)
    assert len(chosen.unique()) == 50


def test_coreset_ratio_is_checked() -> None:
    with pytest.raises(ValueError, match="ratio must be in"):
        greedy_coreset(torch.randn(10, 4), ratio=0.0)
