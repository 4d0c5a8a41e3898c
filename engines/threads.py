"""torch's CPU thread count, set for a block and put back after it.

Two places want one thread where the rest of the process has more:

- the pipeline's own torch work beside a backend with a thread pool of its own (ONNX Runtime,
  OpenVINO): after each torch op its OpenMP threads spin-wait for more work and take the cores
  from the backend's next call (engines/pipeline.py);
- batched LAPACK on small matrices (PaDiM's 1024 inverses and Cholesky factors of 150 x 150):
  on one thread 1 s against 16 s on two (2-core AMD EPYC, torch 2.13's MKL), and after
  ``torch.set_num_threads(2)`` MKL's threaded LU failed outright there ("Parameter 6 was incorrect
  on entry to DLASWP", then a hang), which any backend or pipeline that sets threads would cause.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch on ``n`` CPU threads inside the block (None: as it is), as it was after it."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
