"""``synthetic``: generated parts with their true defect masks, for demos and tests."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from agent.sources import SourceSettings, plugin
from agent.sources.base import FrameSource
from calibration.synthetic import DEFECT_KINDS, synthetic_part


class SyntheticSettings(SourceSettings):
    kind: Literal["synthetic"] = "synthetic"
    count: int = Field(0, ge=0, description="number of frames; 0 = endless (a live source)")
    size: list[int] = Field(default_factory=lambda: [256, 256], description="frame [height, width]")
    defect_rate: float = Field(0.2, ge=0.0, le=1.0, description="share of frames with a drawn defect")
    seed: int = Field(0, description="random seed")
    fps: float = Field(0.0, ge=0.0, description="pacing; 0 = as fast as inference takes the frames")
    distinct: int = Field(0, ge=0, description="repeat this many generated parts in turn (each drawn once, ~5 ms "
                                               "of CPU, as a camera costs the host nothing per frame: measures the "
                                               "agent alone); 0 = a new part every frame")

    @field_validator("size")
    @classmethod
    def _size(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or min(v) < 32:
            raise ValueError(f"expected [height, width], each at least 32, got {v}")
        return v


class SyntheticSource(FrameSource):
    """Generated parts (calibration/synthetic.py); meta['mask'] holds the true defect mask and
    meta['defect'] its kind (None for a good part). Live when ``count`` is 0 (endless)."""

    def __init__(self, cfg: SyntheticSettings) -> None:
        super().__init__(cfg, name="synthetic", live=cfg.count == 0, fps=cfg.fps)
        self._rng = np.random.default_rng(cfg.seed)
        self._drawn: list[tuple[np.ndarray, np.ndarray, str | None]] = []

    def _produce(self) -> None:
        self._stats.connected = True
        while (self.cfg.count == 0 or self._seq < self.cfg.count) and self._pace():
            img, mask, defect = self._next_part()
            if not self._emit(self._captured(img, self.name, {"mask": mask, "defect": defect})):
                return

    def _next_part(self) -> tuple[np.ndarray, np.ndarray, str | None]:
        if self.cfg.distinct and len(self._drawn) == self.cfg.distinct:
            img, mask, defect = self._drawn[self._seq % self.cfg.distinct]
            return img.copy(), mask, defect  # a copy: whatever downstream does to a frame stays with it
        defect = None
        if self._rng.random() < self.cfg.defect_rate:
            defect = DEFECT_KINDS[self._rng.integers(len(DEFECT_KINDS))]
        img, mask = synthetic_part(self._rng, (int(self.cfg.size[0]), int(self.cfg.size[1])), defect)
        if self.cfg.distinct:
            self._drawn.append((img.copy(), mask, defect))
        return img, mask, defect



PLUGINS = [plugin("synthetic", SyntheticSettings, "agent.sources.synthetic",
                  "generated parts with drawn defects (endless: live)")]
SOURCE = SyntheticSource
