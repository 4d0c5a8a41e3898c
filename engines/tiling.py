"""Cutting a large frame into model-size tiles with overlap, and stitching the score maps back.

Serves every method, in the agent, in calibration and in evaluation (through the pipeline).
Tiles are views into the (scaled, padded) frame; stitching happens on the device the maps are
on. Imports no torch: the tiling settings are part of the configuration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
from pydantic import Field

from engines.settings import Settings

if TYPE_CHECKING:
    import torch


class TilingConfig(Settings):
    enabled: bool = Field(False, description="false: the frame is resized to input_size; true: cut into "
                                             "input_size tiles")
    overlap: float = Field(0.25, ge=0.0, lt=1.0, description="share of a tile overlapping its neighbour")
    scale: float = Field(1.0, gt=0.0, le=4.0, description="the frame is resized by this factor before tiling")
    stats: Literal["shared", "per_position"] = Field(
        "shared", description="shared (textures) | per_position (aligned parts, fixed frame size)")


@dataclass(frozen=True)
class TileGrid:
    """Tile origins for a frame of ``height`` x ``width`` (after scaling and padding)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    origins: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.origins)


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    n = math.ceil((length - tile) / step) + 1
    # Spread the tiles evenly so the last one ends exactly at the border.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def make_grid(frame_hw: tuple[int, int], tile_hw: tuple[int, int], cfg: TilingConfig) -> TileGrid:
    h = max(int(round(frame_hw[0] * cfg.scale)), tile_hw[0])
    w = max(int(round(frame_hw[1] * cfg.scale)), tile_hw[1])
    origins = tuple((y, x) for y in _starts(h, tile_hw[0], cfg.overlap) for x in _starts(w, tile_hw[1], cfg.overlap))
    return TileGrid(h, w, tile_hw[0], tile_hw[1], origins)


def prepare_frame(image: np.ndarray, grid: TileGrid, scale: float) -> np.ndarray:
    """Scale the frame and pad it (reflect) up to the grid size when smaller than a tile."""
    if scale != 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ph, pw = grid.height - image.shape[0], grid.width - image.shape[1]
    if ph > 0 or pw > 0:
        image = cv2.copyMakeBorder(image, 0, max(ph, 0), 0, max(pw, 0), cv2.BORDER_REFLECT_101)
    return image


def tiles_of(image: np.ndarray, grid: TileGrid, scale: float) -> list[np.ndarray]:
    """The frame's tiles in grid order: views into the scaled, padded frame, not copies."""
    padded = prepare_frame(image, grid, scale)
    return [padded[y:y + grid.tile_h, x:x + grid.tile_w] for y, x in grid.origins]


class Stitcher:
    """Averages overlapping tile maps into one frame map, on the tile maps' device (the pipeline
    stitches where the maps are, and one map per frame comes down)."""

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self.acc: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None

    def add(self, index: int, tile_map: torch.Tensor) -> None:
        if self.acc is None:
            self.acc = tile_map.new_zeros((self.grid.height, self.grid.width), dtype=tile_map.dtype)
            self.weight = tile_map.new_zeros((self.grid.height, self.grid.width), dtype=tile_map.dtype)
        y, x = self.grid.origins[index]
        self.acc[y:y + self.grid.tile_h, x:x + self.grid.tile_w] += tile_map
        self.weight[y:y + self.grid.tile_h, x:x + self.grid.tile_w] += 1.0

    def result(self, frame_hw: tuple[int, int], scale: float) -> torch.Tensor:
        """The average, cropped to the scaled frame (the pipeline resizes it to the map size)."""
        out = self.acc / self.weight.clamp_min(1.0)
        return out[: int(round(frame_hw[0] * scale)), : int(round(frame_hw[1] * scale))]


def mosaic(features: torch.Tensor) -> torch.Tensor:
    """(T, C, h, w) features of one frame's tiles -> (1, C, T*h, w): the tiles stacked in grid order.

    Per-tile-position statistics are then just per-position statistics of this mosaic, so
    the PaDiM head and its streaming fit serve both modes unchanged.
    """
    t, c, h, w = features.shape
    return features.permute(1, 0, 2, 3).reshape(1, c, t * h, w)


def unmosaic(maps: torch.Tensor, tiles: int) -> torch.Tensor:
    """(1, T*h, w) -> (T, h, w)."""
    return maps.reshape(tiles, -1, maps.shape[-1])
