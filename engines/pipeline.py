"""The one frame path: frames in, score maps and image scores out.

The service, ``evaluate``, calibration's threshold scoring and ``bench`` all score through a
``Pipeline``, so what ``bench`` times is what the line runs:

    frames (uint8 BGR or grey, any size)
      prepare      resized to the model input, or cut into input-size tiles (host; tiles are views)
      score        batches of the tiles of one or more frames, uint8, through the bundle's score
                   graph on the backend (engines/score.py: normalisation, network, head, upsample
                   and blur, one compiled graph): a map per tile and an image score per tile
      stitch       a frame's tiles averaged into one map, at most ``map_max_side`` long, on the
                   device; then one download per frame
      mask         the object mask weights the map (host)

With a coarse whole-frame pass (``ModelSpec.coarse_weight`` > 0, tiled models of a method that
declares it), each frame also gives the engine itself resized to the model input, as one more
input of the same batch; its map, upsampled to the stitched map, is blended in:
``(1 - w) * tiles + w * whole frame``. Tiles see small defects at full resolution, the coarse
pass sees the frame at once (a defect larger than a tile, or wrong only in its place).

Everything that does not depend on the frame (the head's statistics, bound into the runtime;
tile grids per frame size; the mask's references) is prepared once, at start-up. With
``tiling.stats: per_position`` a frame's tiles are one call (the head reads them as one mosaic).

The image score: the peak of the (weighted) map, or, for a method with its own image score
(SPADE, PatchCore reweighted), the score graph's score; with an object mask, either is multiplied by the
mask's weight at the weighted map's peak, so the mask acts on every method's score the same
way. A tiled frame is as anomalous as its worst tile.

Beside a backend with a thread pool of its own (ONNX Runtime, OpenVINO), the pipeline's own torch
work (stitching, resizing maps) runs on one torch thread: after each torch op its OpenMP threads
spin-wait for the next one and take the cores from the backend's next call (OpenVINO, PaDiM at
batch 1 on 2 cores: 7.4 ms per call beside a map resize on two torch threads, 4.6 on one).

Stage timings are wall time per stage on the CPU; on CUDA the device stages are read from CUDA
events once the frame's map is downloaded, so no stage adds a synchronise of its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engines.masks import ObjectMask, load_mask
from engines.threads import torch_threads
from engines.tiling import Stitcher, TileGrid, make_grid, tiles_of

if TYPE_CHECKING:
    from engines.bundle import Bundle
    from engines.runtimes import Backend, RuntimeSettings
    from engines.tiling import TilingConfig

__all__ = ["MAP_MAX_SIDE", "FrameScore", "Pipeline", "map_size", "model_inputs"]

# Score maps of large frames are kept at most this long (side) by default: a 50-megapixel frame
# would otherwise cost a 200 MB float map plus labels per frame, for no better region.
MAP_MAX_SIDE = 1024


@dataclass
class FrameScore:
    map: np.ndarray                 # float32 score map at the frame's aspect, at most map_max_side long
    score: float                    # the image score (see the module docstring)
    frame_hw: tuple[int, int]       # the frame's size; map pixels scale to it by frame_hw / map.shape
    timings_ms: dict[str, float] = field(default_factory=dict)
    unmasked_map: np.ndarray | None = None  # with an object mask: the map before it
    own_score: float | None = None          # the method's own image score before the mask (None: the map's peak)

    @property
    def unmasked_score(self) -> float:
        """The image score without the mask; read by evaluate only, so the peak is found on demand."""
        return self.own_score if self.own_score is not None else float(self.unmasked_map.max())


def map_size(frame_hw: tuple[int, int], max_side: int = MAP_MAX_SIDE) -> tuple[int, int]:
    """The score-map size for a frame: the frame's own, or scaled down to ``max_side``."""
    h, w = int(frame_hw[0]), int(frame_hw[1])
    f = min(1.0, max_side / max(h, w))
    return (h, w) if f >= 1.0 else (max(1, round(h * f)), max(1, round(w * f)))


def model_inputs(image: np.ndarray, input_hw: tuple[int, int], tiling: "TilingConfig",
                 grid: TileGrid | None = None, coarse: bool = False) -> list[np.ndarray]:
    """What the engine takes of a BGR image: the image resized to the model input, or its tiles
    (views, in grid order), followed with ``coarse`` by the resized image. The one preparation,
    for scoring and for fitting alike."""
    h, w = input_hw
    if not tiling.enabled:
        return [cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)]
    tiles = tiles_of(image, grid or make_grid(image.shape[:2], input_hw, tiling), tiling.scale)
    return tiles + [cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)] if coarse else tiles


@dataclass
class _Frame:
    """One frame on its way through: its tiles, and where its map is being assembled."""

    image: np.ndarray
    hw: tuple[int, int]
    grid: TileGrid | None           # None: the whole frame resized to one input
    tiles: list[np.ndarray]
    stitcher: Stitcher | None = None
    map: torch.Tensor | None = None  # the resized frame's map (no grid, or the coarse pass)
    head_score: float | None = None


class Pipeline:
    def __init__(self, bundle: "Bundle", backend: "Backend", runtime: "RuntimeSettings | None" = None,
                 use_mask: bool = True) -> None:
        m = bundle.manifest
        self.bundle, self.backend = bundle, backend
        self.device = backend.device
        self._one_torch_thread = self.device.type == "cpu" and not backend.uses_torch_threads
        self.batch_size = runtime.batch_size if runtime is not None else 8
        self.map_max_side = runtime.map_max_side if runtime is not None else MAP_MAX_SIDE
        self.input_hw = m.input_hw
        self.tiling = m.model.tiling
        self.per_position = m.model.per_position
        self.own_score = m.model.method.own_image_score
        self.coarse_weight = m.model.coarse_weight
        self._grid = lru_cache(maxsize=8)(lambda hw: make_grid(hw, self.input_hw, self.tiling))
        self.frame_size = tuple(m.frame_size)
        self.position_tiles = len(self._grid(self.frame_size)) if self.per_position else 0
        self.mask: ObjectMask | None = None
        if use_mask and m.model.mask.kind != "none":
            self.mask = load_mask(m.model.mask, [r.model_dump() for r in m.mask_files], bundle.path, m.mask_learnt)

    def score_frame(self, image: np.ndarray) -> FrameScore:
        return self.score([image])[0]

    @torch.inference_mode()
    def score(self, images: list[np.ndarray]) -> list[FrameScore]:
        """Score maps and image scores of ``images``, their tiles batched together."""
        with torch_threads(1 if self._one_torch_thread else None):
            return self._score(images)

    def _score(self, images: list[np.ndarray]) -> list[FrameScore]:
        clock = _Clock(self.device)
        frames = [self._prepare(img) for img in images]
        clock.lap("prepare")
        for chunk in self._batches(frames):
            maps, scores = self.backend.run(torch.from_numpy(np.stack([f.tiles[i] for f, i in chunk])))
            clock.lap("score", device=True)
            own = scores.tolist() if self.own_score else None
            for k, (frame, i) in enumerate(chunk):
                self._place(frame, i, maps[k])
                if own is not None:  # a tiled frame is as anomalous as its worst tile
                    frame.head_score = own[k] if frame.head_score is None else max(frame.head_score, own[k])
            clock.lap("stitch", device=True)
        maps = self._download(frames, clock)
        out = [self._finish(frame, m, clock) for frame, m in zip(frames, maps)]
        per_frame = {k: v / len(frames) for k, v in clock.totals().items()}
        for fs in out:
            fs.timings_ms = dict(per_frame)
        return out

    # -- stages ---------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray) -> _Frame:
        bgr = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        hw = (int(bgr.shape[0]), int(bgr.shape[1]))
        grid = self._grid(hw) if self.tiling.enabled else None
        if self.per_position and len(grid) != self.position_tiles:
            raise ValueError(f"the frame is {hw[0]}x{hw[1]} ({len(grid)} tiles); this model keeps statistics per tile "
                             f"position and was calibrated on {self.frame_size[0]}x{self.frame_size[1]} frames "
                             f"({self.position_tiles} tiles)")
        return _Frame(bgr, hw, grid, model_inputs(bgr, self.input_hw, self.tiling, grid, self.coarse_weight > 0),
                      Stitcher(grid) if grid is not None else None)

    def _batches(self, frames: list[_Frame]) -> Iterator[list[tuple[_Frame, int]]]:
        """(frame, tile index) chunks for the backend: ``batch_size`` tiles that may span frames, or, per
        tile position, each frame's tiles together."""
        if self.per_position:
            for f in frames:
                yield [(f, i) for i in range(len(f.tiles))]
            return
        owners = [(f, i) for f in frames for i in range(len(f.tiles))]
        for start in range(0, len(owners), self.batch_size):
            yield owners[start:start + self.batch_size]

    @staticmethod
    def _place(frame: _Frame, index: int, tile_map: torch.Tensor) -> None:
        if frame.stitcher is None or index == len(frame.grid):  # the whole frame: resized, or the coarse pass
            frame.map = tile_map
        else:
            frame.stitcher.add(index, tile_map)

    def _download(self, frames: list[_Frame], clock: "_Clock") -> list[np.ndarray]:
        """Each frame's map, cropped to the frame and resized to its map size on the device, then
        brought to the host: one small copy per frame."""
        out = []
        for frame in frames:
            m = frame.map if frame.stitcher is None else frame.stitcher.result(frame.hw, self.tiling.scale)
            if frame.stitcher is not None and frame.map is not None:
                coarse = F.interpolate(frame.map[None, None], size=tuple(m.shape), mode="bilinear",
                                       align_corners=False)[0, 0]
                m = (1.0 - self.coarse_weight) * m + self.coarse_weight * coarse
            size = map_size(frame.hw, self.map_max_side)
            if tuple(m.shape) != size:
                m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            out.append(m)
        clock.lap("stitch", device=True)
        host = [m.cpu().numpy() for m in out]
        clock.lap("download", device=True)
        clock.settle()
        return host

    def _finish(self, frame: _Frame, score_map: np.ndarray, clock: "_Clock") -> FrameScore:
        if self.mask is None:
            score = float(score_map.max()) if frame.head_score is None else frame.head_score
            return FrameScore(score_map, score, frame.hw)
        t = time.perf_counter()
        weights = self.mask.weights(frame.image, score_map.shape)
        weighted = score_map * weights
        peak = np.unravel_index(int(np.argmax(weighted)), weighted.shape)
        score = float(weighted[peak]) if frame.head_score is None else frame.head_score * float(weights[peak])
        clock.add("mask", (time.perf_counter() - t) * 1000.0)
        return FrameScore(weighted, score, frame.hw, unmasked_map=score_map, own_score=frame.head_score)


class _Clock:
    """Stage times (ms). Host stages are wall time between laps; on CUDA, stages marked ``device``
    are timed by CUDA events, read after the download (which waits for the device anyway)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t = time.perf_counter()
        self.times: dict[str, float] = {}
        self.events: list[tuple[str | None, torch.cuda.Event]] = []  # (device stage or None, its end)
        if self.cuda:
            self.events.append((None, self._event()))

    def lap(self, stage: str, device: bool = False) -> None:
        now = time.perf_counter()
        if self.cuda:
            self.events.append((stage if device else None, self._event()))
        if not (self.cuda and device):
            self.add(stage, (now - self.t) * 1000.0)
        self.t = now

    def add(self, stage: str, ms: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + ms

    def settle(self) -> None:
        """Turn the recorded CUDA events into stage times (the events have completed by now)."""
        for (_, before), (stage, after) in zip(self.events, self.events[1:]):
            if stage is not None:
                self.add(stage, before.elapsed_time(after))
        self.events = self.events[-1:]

    def totals(self) -> dict[str, float]:
        return dict(self.times)

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
