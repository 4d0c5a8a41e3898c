"""Feeding good images to a fitter: read, resize or tile, normalise, batch, with progress."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from tqdm import tqdm

from engines.tiling import TilingConfig, iter_tiles, make_grid, prepare_frame
from calibration.data import read_image


@dataclass
class TrainImages:
    paths: list[Path]
    input_hw: tuple[int, int]
    tiling: TilingConfig
    batch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    progress: bool = True

    def model_images(self, path: Path) -> list[np.ndarray]:
        """The model-size images one file yields: itself resized, or its tiles."""
        img = read_image(path)
        h, w = self.input_hw
        if not self.tiling.enabled:
            return [cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)]
        grid = make_grid(img.shape[:2], self.input_hw, self.tiling)
        frame = prepare_frame(img, grid, self.tiling.scale)
        return [t for _, tiles in iter_tiles(frame, grid, len(grid)) for t in tiles]

    def normalise(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).flip(1).float()
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def per_image(self, desc: str = "fit") -> Iterator[torch.Tensor]:
        """One normalised (T, 3, H, W) group per file: its tiles in grid order (or the image alone)."""
        for path in tqdm(self.paths, desc=desc, unit="img", disable=not self.progress, leave=False):
            yield self.normalise(self.model_images(path))

    def batches(self, desc: str = "fit") -> Iterator[torch.Tensor]:
        """Normalised (B, 3, H, W) batches over every image (or tile), in file order."""
        pending: list[np.ndarray] = []
        for path in tqdm(self.paths, desc=desc, unit="img", disable=not self.progress, leave=False):
            pending.extend(self.model_images(path))
            while len(pending) >= self.batch_size:
                yield self.normalise(pending[: self.batch_size])
                pending = pending[self.batch_size:]
        if pending:
            yield self.normalise(pending)
