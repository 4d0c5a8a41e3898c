"""Fitting an object mask at calibration: the part's shape learnt from the good images, and
reference good images with the part's outline on each.

The run-time side (matching a frame to the references, ROI polygons) is engines/masks.py; this
module writes what it needs into the bundle (``mask/learnt.png``; for ``features`` also
``mask/ref_<i>.png``, ``mask/object_<i>.png``).

The learnt shape (``learnt``, and the fallback of ``features``) is a per-pixel foreground model:
the part is split from the background on each good image (below), and a pixel belongs to the
part where at least ``_LEARNT_MIN_SHARE`` of the good images have it there, so the shape covers
where the part sits across the line's position jitter. It is the shape the part *should*
occupy: a part with a piece missing is scored over the missing piece too. Where most good
images have no part/background split (a texture filling the frame) the shape is the whole frame.

The reference object mask (``mask.object``) is derived once, here: ``auto`` splits the
reference into part and background with Otsu's threshold, but only where the histogram is
clearly two-sided (the split explains at least ``_MIN_SEPARATION`` of the grey variance; a
unimodal texture gives about 2/pi = 0.64); the side holding most border pixels is the
background. A part that fills the frame (a texture) has no such split, and the whole reference
frame is then the object. ``polygons`` uses the configured polygons drawn on the references;
``frame`` always uses the whole reference frame.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.masks import MaskConfig, check_detector

__all__ = ["FittedMask", "fit_mask", "learn_shape", "reference_object"]

log = logging.getLogger(__name__)

_MIN_SEPARATION = 0.75      # Otsu between-class / total variance needed to call it part vs background
_MIN_COMPONENT = 0.01       # object components smaller than this share of the frame are noise
_LEARNT_MIN_SHARE = 0.1     # a pixel is the part's where at least this share of the good images have it
_LEARNT_IMAGES = 64         # good images the shape is learnt from (spread over the set)
_LEARNT = "mask/learnt.png"


@dataclass
class FittedMask:
    references: list[dict[str, Any]]   # the manifest's mask_files
    learnt: str | None                 # the manifest's mask_learnt


def fit_mask(cfg: MaskConfig, good_paths: list[Path], bundle_dir: Path) -> FittedMask:
    """Write what the mask needs into ``bundle_dir`` (``mask/``) and say what was written: nothing
    for ROI polygons, which the settings hold."""
    if cfg.kind == "roi":
        return FittedMask([], None)
    if cfg.kind not in ("learnt", "features"):
        raise ValueError(f"mask.kind: no mask to fit for {cfg.kind!r}")
    if cfg.kind == "features":
        check_detector(cfg.detector)  # fail before writing anything
    if not good_paths:
        raise ValueError("mask: no good images to take references from")
    out = Path(bundle_dir) / "mask"
    out.mkdir(parents=True, exist_ok=True)
    shape, how = learn_shape([_read_grey(p) for p in _spread(good_paths, _LEARNT_IMAGES)], cfg.margin)
    _imwrite(Path(bundle_dir) / _LEARNT, shape)
    log.info("learnt mask from %s: %.0f%% of the frame", how, 100 * float((shape > 0).mean()))
    if cfg.kind == "learnt":
        return FittedMask([], _LEARNT)
    return FittedMask(_fit_references(cfg, good_paths, out), _LEARNT)


def learn_shape(greys: list[np.ndarray], margin: float) -> tuple[np.ndarray, str]:
    """Where the part is on the good images (uint8 0/255 at the first image's size), and how it was
    found: ``foreground`` (the per-pixel share of images with the part there) or ``frame``."""
    h, w = greys[0].shape
    objects = [_otsu_object(cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA) if g.shape != (h, w) else g)
               for g in greys]
    found = [o for o in objects if o is not None]
    if len(found) < max(1, len(greys) / 2):  # most have no part/background split: a texture
        return np.full((h, w), 255, np.uint8), "frame"
    share = np.mean([o > 0 for o in found], axis=0)
    shape = (share >= _LEARNT_MIN_SHARE).astype(np.uint8) * 255
    return _dilated(shape, margin), "foreground"


def _fit_references(cfg: MaskConfig, good_paths: list[Path], out: Path) -> list[dict[str, Any]]:
    picks = sorted({int(i) for i in np.linspace(0, len(good_paths) - 1, min(cfg.references, len(good_paths)))})
    files = []
    for n, i in enumerate(picks):
        grey = _read_grey(good_paths[i])
        obj, how = reference_object(grey, cfg)
        _imwrite(out / f"ref_{n}.png", grey)
        _imwrite(out / f"object_{n}.png", obj)
        files.append({"image": f"mask/ref_{n}.png", "object": f"mask/object_{n}.png",
                      "source": good_paths[i].name, "object_from": how,
                      "object_share": round(float((obj > 0).mean()), 4)})
        log.info("mask reference %d: %s, object from %s (%.0f%% of the frame)", n, good_paths[i].name, how,
                 100 * files[-1]["object_share"])
    return files


def reference_object(grey: np.ndarray, cfg: MaskConfig) -> tuple[np.ndarray, str]:
    """The part on a reference image as uint8 0/255, and how it was found (otsu, frame, polygons)."""
    h, w = grey.shape
    if cfg.object == "polygons":
        obj = np.zeros((h, w), np.uint8)
        cv2.fillPoly(obj, [np.round(np.asarray(p)).astype(np.int32) for p in cfg.polygons], 255)
        if not obj.any():
            raise ValueError(f"mask.polygons: no polygon covers any pixel of the {w} x {h} reference image")
        return obj, "polygons"
    if cfg.object == "auto":
        obj = _otsu_object(grey)
        if obj is not None:
            return obj, "otsu"
    return np.full((h, w), 255, np.uint8), "frame"


def _otsu_object(grey: np.ndarray) -> np.ndarray | None:
    """Part vs background by Otsu, or None where the image has no clear two-sided histogram."""
    h, w = grey.shape
    smooth = cv2.GaussianBlur(grey, (0, 0), max(1.0, min(h, w) / 200))
    t, fg = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    values = smooth.astype(np.float64)
    low, high = values[values <= t], values[values > t]
    total = values.var()
    if total == 0 or not len(low) or not len(high):
        return None
    between = len(low) * len(high) / values.size ** 2 * (low.mean() - high.mean()) ** 2
    if between / total < _MIN_SEPARATION:
        return None
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    if (border > 0).mean() > 0.5:   # the bright side touches the border most: it is the background
        fg = 255 - fg
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    fg = cv2.morphologyEx(cv2.morphologyEx(fg, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= _MIN_COMPONENT * h * w]
    obj = np.isin(labels, keep).astype(np.uint8) * 255
    share = (obj > 0).mean()
    return obj if 0.02 <= share <= 0.95 else None


def _spread(paths: list[Path], n: int) -> list[Path]:
    return [paths[int(i)] for i in sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(n, len(paths)))})]


def _read_grey(path: Path) -> np.ndarray:
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError(f"{path}: cannot read the mask image")
    return grey


def _dilated(mask: np.ndarray, margin: float) -> np.ndarray:
    r = int(round(margin * max(mask.shape[:2])))
    if r <= 0:
        return mask
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: cannot write")
