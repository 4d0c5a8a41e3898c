"""The training loop the learned methods share (autoencoders, GANs): seeded, with progress,
early stopping on a criterion measured on held-out good images, on CUDA where present.

Used by the methods' ``fit`` (engines/methods); calibration drives it.

A method supplies one optimisation step on a batch and a validation criterion (lower is
better); the loop shuffles, steps, validates once per epoch, keeps the best weights and stops
after ``patience`` epochs without improvement.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engines.methods import FitData

log = logging.getLogger(__name__)

Step = Callable[[torch.Tensor], dict[str, float]]
Criterion = Callable[[], float]


@dataclass
class TrainLog:
    epochs_run: int
    best_epoch: int
    best_val: float
    stopped_early: bool
    fit_s: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "best_val": self.best_val,
                "stopped_early": self.stopped_early, "fit_s": self.fit_s, "history": self.history}


def train_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and random; returns a generator for the data order and latents."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.inference_mode()
def load_all(images: FitData, desc: str, transform: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device | None = None) -> torch.Tensor:
    """Every batch once through ``transform`` (normalisation, or the feature network), concatenated
    on the CPU: the epochs then skip decoding."""
    out = []
    for x in images.batches(desc):
        out.append(transform(x.to(device or "cpu")).cpu())
    if not out:
        raise ValueError(f"{desc}: no training images")
    return torch.cat(out).clone()


def standardise(data: torch.Tensor, per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, C, h, w) -> (standardised, mean, std): per channel, mean and std (1, C, 1, 1);
    ``per_position``, (1, C, h, w), each position of the grid its own (PaDiM's diagonal)."""
    dims = (0,) if per_position else (0, 2, 3)
    mean = data.mean(dims, keepdim=True)
    std = data.std(dims, keepdim=True).clamp_min(1e-6)
    return (data - mean) / std, mean, std


def floored_spread(spread: torch.Tensor) -> torch.Tensor:
    """A per-position deviation of a score map on good inputs, floored at a tenth of its mean, so
    that no position divides by ~0 (the trained methods' per-position map statistics)."""
    return spread.clamp_min(0.1 * float(spread.mean()) + 1e-12)


def shuffled(data: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(len(data), generator=gen)
    for i in range(0, len(data), batch_size):
        yield data[order[i:i + batch_size]]


def fit_loop(modules: dict[str, nn.Module], data: torch.Tensor, step: Step, criterion: Criterion,
             epochs: int, patience: int, batch_size: int, gen: torch.Generator, device: torch.device,
             desc: str, progress: bool = True, max_seconds: float = float("inf"),
             average: float = 0.0) -> TrainLog:
    """Train; on return ``modules`` hold the weights of the best validation epoch. Stops after
    ``patience`` epochs without improvement, or after the epoch that passes ``max_seconds``.
    ``average`` > 0: each epoch is judged (and kept) by an exponential moving average of the
    weights over the steps (decay ``average``) instead of the last step's."""
    start = time.perf_counter()
    best, best_epoch, best_state, history = float("inf"), 0, None, []
    shadow = _Shadow(modules, average) if average > 0 else None
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        for m in modules.values():
            m.train()
        sums: dict[str, float] = {}
        n = 0
        for batch in shuffled(data, batch_size, gen):
            for k, v in step(batch.to(device)).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if shadow is not None:
                shadow.update()
        for m in modules.values():
            m.eval()
        if shadow is not None:
            shadow.swap()  # judge (and keep) the averaged weights; the steps go on from the raw ones
        with torch.no_grad():
            val = float(criterion())
        record = {"epoch": epoch, "val": val, **{k: v / max(n, 1) for k, v in sums.items()}}
        history.append(record)
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
        # Without a progress bar (a log, a service), each epoch is a log line.
        log.log(logging.DEBUG if progress else logging.INFO, "%s epoch %d: %s", desc, epoch,
                {k: round(v, 5) for k, v in record.items()})
        improved = val < best
        if improved:
            best, best_epoch = val, epoch
            best_state = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
        if shadow is not None:
            shadow.swap()
        if not improved and epoch - best_epoch >= patience:
            break
        if time.perf_counter() - start >= max_seconds:
            log.info("%s: time budget of %.0f s spent after epoch %d", desc, max_seconds, epoch)
            break
    if best_state is not None:
        for name, m in modules.items():
            m.load_state_dict(best_state[name])
    epochs_run = len(history)
    log.info("%s: %d epochs, best val %.5g at epoch %d", desc, epochs_run, best, best_epoch)
    return TrainLog(epochs_run, best_epoch, best, epochs_run < epochs, time.perf_counter() - start, history)


class _Shadow:
    """An exponential moving average of the modules' floating-point state (weights and batch-norm
    statistics), swapped in and out in place."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        self.decay = decay
        self.live = [t for m in modules.values() for t in m.state_dict().values() if t.is_floating_point()]
        self.mean = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self) -> None:
        for live, mean in zip(self.live, self.mean):
            mean.lerp_(live, 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for live, mean in zip(self.live, self.mean):
            tmp = live.detach().clone()
            live.copy_(mean)
            mean.copy_(tmp)


def batched(data: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Fixed-order batches for validation."""
    for i in range(0, len(data), batch_size):
        yield data[i:i + batch_size].to(device)
