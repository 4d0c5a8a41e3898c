"""Good images for fitting: read, prepared as the pipeline prepares frames, batched, with progress.

Implements engines.methods.FitData: the engine takes uint8 BGR tiles (it normalises inside its
graph), so fitting and scoring see the same inputs (engines.pipeline.model_inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from calibration.data import read_image
from engines.pipeline import model_inputs
from engines.tiling import TilingConfig

__all__ = ["TrainImages"]


@dataclass
class TrainImages:
    paths: list[Path]
    input_hw: tuple[int, int]
    tiling: TilingConfig
    batch_size: int
    progress: bool = True

    def __len__(self) -> int:
        return len(self.paths)

    def inputs(self) -> int:
        """Model inputs the set yields (tiles per file from the first file)."""
        return len(self.paths) * len(self.model_images(self.paths[0])) if self.paths else 0

    def whole_frames(self) -> "TrainImages":
        """The same files, each resized whole to the model input (what a tiled model's coarse
        whole-frame pass scores)."""
        return replace(self, tiling=TilingConfig(enabled=False))

    def model_images(self, path: Path) -> list[np.ndarray]:
        """The model-size images one file yields: itself resized, or its tiles."""
        return model_inputs(read_image(path), self.input_hw, self.tiling)

    def per_image(self, desc: str = "fit") -> Iterator[torch.Tensor]:
        """One uint8 (T, H, W, 3) group per file: its tiles in grid order (or the image alone)."""
        for path in tqdm(self.paths, desc=desc, unit="img", disable=not self.progress, leave=False):
            yield torch.from_numpy(np.stack(self.model_images(path)))

    def batches(self, desc: str = "fit") -> Iterator[torch.Tensor]:
        """uint8 (B, H, W, 3) batches over every image (or tile), in file order."""
        pending: list[np.ndarray] = []
        for path in tqdm(self.paths, desc=desc, unit="img", disable=not self.progress, leave=False):
            pending.extend(self.model_images(path))
            while len(pending) >= self.batch_size:
                yield torch.from_numpy(np.stack(pending[: self.batch_size]))
                pending = pending[self.batch_size:]
        if pending:
            yield torch.from_numpy(np.stack(pending))
