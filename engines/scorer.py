"""From images to anomaly maps: preprocessing, engine, head, upsampling, blur and tiling.

Everything a frame needs that does not depend on the frame (head statistics on the device,
normalisation constants, the blur kernel, the tile grid for a frame size) is prepared once
here, at start-up, not per frame.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engines.tiling import Stitcher, TileGrid, TilingConfig, iter_tiles, make_grid, mosaic, prepare_frame, unmosaic
from engines.bundle import Bundle
from engines.heads import build_head
from engines.runtimes.base import Backend


# Score maps of large frames are kept at most this long (side): a 50-megapixel frame would
# otherwise cost a 200 MB float map plus labels per frame, for no better region than this gives.
MAP_MAX_SIDE = 1024


@dataclass
class FrameScore:
    map: np.ndarray                 # float32 anomaly map at the frame's aspect, at most map_max_side long
    score: float                    # image score: the map's maximum, or the head's own image score
    frame_hw: tuple[int, int] = (0, 0)  # the frame's size; map pixels scale to it by frame_hw / map.shape
    timings_ms: dict[str, float] = field(default_factory=dict)
    head_score: bool = False        # True where the head gave an image-level score (SPADE, PatchCore)


def map_size(frame_hw: tuple[int, int], max_side: int = MAP_MAX_SIDE) -> tuple[int, int]:
    """The score-map size for a frame: the frame's own, or scaled down to ``max_side``."""
    h, w = int(frame_hw[0]), int(frame_hw[1])
    f = min(1.0, max_side / max(h, w))
    return (h, w) if f >= 1.0 else (max(1, round(h * f)), max(1, round(w * f)))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


class Scorer:
    def __init__(self, bundle: Bundle, backend: Backend, batch_size: int = 8, use_mask: bool = True,
                 map_max_side: int = MAP_MAX_SIDE) -> None:
        m = bundle.manifest
        self.bundle, self.backend, self.batch_size = bundle, backend, batch_size
        self.map_max_side = map_max_side
        self.device = backend.device
        self.input_hw = m.input_hw
        self.head = build_head(m.method, m.head, bundle.head_tensors()).to(self.device)
        self.mean = torch.tensor(m.input["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(m.input["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        sigma = float(m.postprocess.get("blur_sigma", 0.0))
        self.kernel = gaussian_kernel(sigma).to(self.device) if sigma > 0 else None
        self.tiling = TilingConfig(**m.tiling)
        self._grid = lru_cache(maxsize=8)(self._make_grid)
        self.mask = None
        if use_mask and m.mask and m.mask.get("kind", "none") != "none":
            from engines.masks import load_mask

            self.mask = load_mask(m.mask, bundle.path)

    def _make_grid(self, frame_hw: tuple[int, int]) -> TileGrid:
        return make_grid(frame_hw, self.input_hw, self.tiling)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Model-size BGR or grey uint8 images -> normalised RGB float batch on the device."""
        arr = np.stack([img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) for img in images])
        # Upload uint8 (4x less traffic than float), convert on the device.
        x = torch.from_numpy(arr).to(self.device, non_blocking=True).permute(0, 3, 1, 2).flip(1).float()
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def maps(self, x: torch.Tensor, timings: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised batch -> blurred anomaly maps (B, H, W) at input size, on the device, and the
        head's image scores (B,) where the head gives them (heads may return ``(map, image_score)``)."""
        t = _Clock(self.device, timings)
        outputs = self.backend.run(x)
        t.lap("network")
        raw = self.head(outputs, x)
        raw, image_scores = raw if isinstance(raw, tuple) else (raw, None)
        t.lap("head")
        up = self._upsample_blur(raw)
        t.lap("postprocess")
        return up, image_scores

    def _upsample_blur(self, raw: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(raw[:, None], size=self.input_hw, mode="bilinear", align_corners=False)
        if self.kernel is not None:
            up = _blur(up, self.kernel)
        return up[:, 0]

    def score_frame(self, image: np.ndarray) -> FrameScore:
        """A whole frame, resized or tiled as the bundle was calibrated."""
        return self.score_frames([image])[0]

    def score_frames(self, images: list[np.ndarray]) -> list[FrameScore]:
        scored = self._score_unmasked(images)
        if self.mask is not None:
            for img, fs in zip(images, scored):
                t = time.perf_counter()
                fs.map = fs.map * self.mask.weights(img, fs.map.shape)
                fs.score = fs.score if fs.head_score else float(fs.map.max())
                fs.timings_ms["mask"] = (time.perf_counter() - t) * 1000.0
        return scored

    def _score_unmasked(self, images: list[np.ndarray]) -> list[FrameScore]:
        if self.tiling.enabled:
            return [self._score_tiled(img) for img in images]
        timings: dict[str, float] = {}
        t = _Clock(self.device, timings)
        h, w = self.input_hw
        x = self.preprocess([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in images])
        t.lap("preprocess")
        maps, head_scores = self.maps(x, timings)
        t.restart()  # maps() timed its own stages
        maps = maps.cpu().numpy()
        head_scores = None if head_scores is None else head_scores.cpu().numpy()
        t.lap("download")
        out = []
        for i, (img, m) in enumerate(zip(images, maps)):
            mh, mw = map_size(img.shape[:2], self.map_max_side)
            full = cv2.resize(m, (mw, mh), interpolation=cv2.INTER_LINEAR)
            score = float(m.max()) if head_scores is None else float(head_scores[i])
            out.append(FrameScore(full, score, img.shape[:2], {}, head_scores is not None))
        t.lap("stitch")
        per = {k: v / len(images) for k, v in timings.items()}
        for fs in out:
            fs.timings_ms = dict(per)
        return out

    def _score_tiled(self, image: np.ndarray) -> FrameScore:
        timings: dict[str, float] = {}
        t = _Clock(self.device, timings)
        frame_hw = image.shape[:2]
        grid = self._grid(frame_hw)
        frame = prepare_frame(image, grid, self.tiling.scale)
        if self.tiling.stats == "per_position":
            return self._score_per_position(frame, frame_hw, grid, t, timings)
        stitcher = Stitcher(grid)
        head_score = None
        for idx, tiles in iter_tiles(frame, grid, self.batch_size):
            x = self.preprocess(tiles)
            t.lap("preprocess")
            maps, scores = self.maps(x, timings)
            t.restart()
            maps = maps.cpu().numpy()
            if scores is not None:  # a frame is as anomalous as its worst tile
                head_score = max(head_score or -np.inf, float(scores.max()))
            t.lap("download")
            for i, m in zip(idx, maps):
                stitcher.add(i, m)
            t.lap("stitch")
        full = stitcher.result(frame_hw, self.tiling.scale, map_size(frame_hw, self.map_max_side))
        t.lap("stitch")
        if head_score is None:
            return FrameScore(full, float(full.max()), frame_hw, timings)
        return FrameScore(full, head_score, frame_hw, timings, True)


    @torch.inference_mode()
    def _score_per_position(self, frame: np.ndarray, frame_hw: tuple[int, int], grid: TileGrid, t: "_Clock",
                            timings: dict[str, float]) -> FrameScore:
        """Aligned parts: every tile position has its own statistics, so all tiles go to the head together."""
        expected = int(self.bundle.manifest.head.get("tiles", 0))
        if len(grid) != expected:
            raise ValueError(f"frame {frame_hw[1]}x{frame_hw[0]} gives {len(grid)} tiles, but model "
                             f"{self.bundle.manifest.model_id} has statistics for {expected} tile positions "
                             "(calibrated on another frame size)")
        feats = []
        for _, tiles in iter_tiles(frame, grid, self.batch_size):
            x = self.preprocess(tiles)
            t.lap("preprocess")
            feats.append(self.backend.run(x)[0])
            t.lap("network")
        raw = self.head([mosaic(torch.cat(feats))], None)
        t.lap("head")
        maps = self._upsample_blur(unmosaic(raw, len(grid)))
        t.lap("postprocess")
        maps = maps.cpu().numpy()
        t.lap("download")
        stitcher = Stitcher(grid)
        for i, m in enumerate(maps):
            stitcher.add(i, m)
        full = stitcher.result(frame_hw, self.tiling.scale, map_size(frame_hw, self.map_max_side))
        t.lap("stitch")
        return FrameScore(full, float(full.max()), frame_hw, timings)


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    r = kernel.numel() // 2
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


class _Clock:
    """Adds wall time per stage to ``timings`` (ms); synchronises CUDA so stages are honest."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.timings, self.cuda = timings, device.type == "cuda"
        self.t = time.perf_counter()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.t) * 1000.0
        self.t = now
