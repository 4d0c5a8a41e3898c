"""Object masks: restrict scoring to the part (static ROI polygons, a learnt mask, feature matching).

Three kinds, each giving a weight map in [outside_weight, 1] that the pipeline multiplies into
the score map before the image score:

- ``roi``: polygons from the config, in frame pixels, rasterised once per frame size.
- ``learnt``: where the part is on the good images of the calibration (``mask/learnt.png``,
  calibration/masks.py), for aligned parts, smooth ones included (no keypoints needed). It is the
  shape the part *should* occupy, so a missing piece stays inside it.
- ``features``: a few good images from calibration are kept in the bundle as references
  (``mask/ref_<i>.png``) with the object's outline on each (``mask/object_<i>.png``). Each frame's
  keypoints (ORB, SIFT, AKAZE or BRISK) are matched to the references (Lowe ratio test) and a
  homography is fitted with RANSAC; with enough inliers and a plausible homography the reference
  object (the whole reference shape, so a missing piece stays inside) is warped onto the frame.
  A frame that does not lock on falls back to the learnt mask, or to the whole frame: never to
  the region of the few matched points, which covered 13 % of an MTD frame and cut away most of
  its defects. Fallbacks are counted (``counts``, in health) and logged at most once a minute.

Every mask counts its frames by how the part was found (``counts``: homography, learnt, all, roi).
The references, their outlines and the learnt mask are written at calibration (calibration/masks.py).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
from pydantic import Field, model_validator

from engines.settings import SettingError, Settings

log = logging.getLogger(__name__)

_RANSAC_PX = 3.0            # reprojection tolerance at the matching scale
_MAX_SCALE_CHANGE = 2.0     # a homography scaling the part by more than this is implausible
_WARN_EVERY_S = 60.0        # fallback warnings: at most one per this many seconds (the counts tell the rest)


class MaskConfig(Settings):
    kind: Literal["none", "roi", "learnt", "features"] = Field(
        "none", description="none | roi (the polygons below) | learnt (where the part is on the good images; "
                            "aligned parts) | features (keypoints matched to reference good images; falls back "
                            "to the learnt mask)")
    polygons: list[list[list[float]]] = Field(
        default_factory=list, description="[[[x, y], ...], ...] in pixels: roi on the frame; features with "
                                          "object: polygons, the part on the references")
    detector: Literal["orb", "sift", "akaze", "brisk"] = Field(
        "orb", description="features: keypoint detector (AKAZE and BRISK come from opencv-contrib "
                           "with OpenCV 5)")
    references: int = Field(3, ge=1, description="features: good images kept in the bundle as references")
    object: Literal["auto", "polygons", "frame"] = Field(
        "auto", description="features: the part on a reference: auto (Otsu where part and background "
                            "separate, else the whole frame) | polygons | frame")
    max_keypoints: int = Field(1000, ge=8, description="features: strongest keypoints kept per image")
    match_side: int = Field(512, ge=64, description="features: images are matched at this longest side or "
                                                    "smaller (bounds per-frame work)")
    ratio: float = Field(0.75, gt=0.0, lt=1.0, description="features: Lowe ratio test")
    min_matches: int = Field(12, ge=4, description="features: RANSAC inliers needed to warp the reference "
                                                   "object mask onto the frame (a homography needs 4)")
    margin: float = Field(0.01, ge=0.0, lt=0.5, description="learnt, features: dilation of the object mask, "
                                                            "share of the frame's longest side")
    # 0.6-0.8 lifted pixel AUPR in the seed study; 0 zeroes the map wherever the mask misses the part
    # (an ORB mask at 0 took MTD's pixel AUROC from 0.98 to 0.56), so the default keeps most of it.
    outside_weight: float = Field(0.7, ge=0.0, le=1.0, description="score-map weight outside the object (0..1); "
                                                                   "0 drops everything the mask misses")

    @model_validator(mode="after")
    def _consistent(self) -> "MaskConfig":
        for i, poly in enumerate(self.polygons):
            if len(poly) < 3 or any(len(p) != 2 for p in poly):
                raise SettingError(f"polygons[{i}]", f"expected at least 3 [x, y] points, got {poly!r}")
        needs_polygons = self.kind == "roi" or (self.kind == "features" and self.object == "polygons")
        if needs_polygons and not self.polygons:
            raise SettingError("polygons", f"kind {self.kind!r} with object {self.object!r} needs at least "
                                           "one polygon")
        return self


class ObjectMask(Protocol):
    counts: Counter[str]   # frames by how the part was found: homography, learnt, all, roi

    def weights(self, image: np.ndarray, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Float32 weights in [outside_weight, 1] for the score map of ``image``, at ``out_hw``
        (the score map's size, at the frame's aspect; default: the frame's size)."""
        ...


@dataclass
class Located:
    """Where the part is in one frame."""

    mask: np.ndarray               # float32 frame-size object mask in [0, 1]
    how: Literal["homography", "learnt", "all"]
    homography: np.ndarray | None  # reference pixels -> frame pixels (3 x 3), where used
    reference: int | None          # index of the reference that matched best
    matches: int                   # ratio-test matches with that reference
    inliers: int                   # RANSAC inliers of its homography (the most of any reference)


# --- static regions of interest --------------------------------------------------------------

class RoiMask:
    """Configured polygons, rasterised once per frame size."""

    def __init__(self, polygons: list[list[list[float]]], outside_weight: float) -> None:
        self.polygons = [np.asarray(p, np.float64) for p in polygons]
        self.outside_weight = outside_weight
        self._weights = lru_cache(maxsize=8)(self._rasterise)
        self.counts: Counter[str] = Counter()

    def weights(self, image: np.ndarray, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        # Cached and shared between frames: callers multiply, never write into it.
        frame_hw = tuple(image.shape[:2])
        self.counts["roi"] += 1
        return self._weights(frame_hw, tuple(out_hw or frame_hw))

    def _rasterise(self, frame_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
        inside = np.zeros(out_hw, np.uint8)
        # Polygons are in frame pixels; the map may be smaller (sub-pixel precision keeps thin parts).
        shift = 4
        sx, sy = out_hw[1] / frame_hw[1] * (1 << shift), out_hw[0] / frame_hw[0] * (1 << shift)
        scaled = [np.round(p * np.array([sx, sy])).astype(np.int32) for p in self.polygons]
        cv2.fillPoly(inside, scaled, 1, shift=shift)
        if not inside.any():
            raise ValueError(f"mask.polygons: no polygon covers any pixel of a {frame_hw[1]} x {frame_hw[0]} "
                             "frame (polygons are [x, y] in frame pixels)")
        w = _to_weights(inside.astype(np.float32), self.outside_weight)
        w.setflags(write=False)
        return w


# --- learnt from the good images -------------------------------------------------------------------

class LearntMask:
    """The part where the good images of the calibration had it (aligned parts): one static shape,
    resized once per map size."""

    def __init__(self, shape: np.ndarray, outside_weight: float) -> None:
        self.shape = shape  # uint8 0/255 at the calibration frame size (or smaller, same aspect)
        self.outside_weight = outside_weight
        self._inside = lru_cache(maxsize=8)(self._resized)
        self._weights = lru_cache(maxsize=8)(lambda hw: _frozen(_to_weights(self._inside(hw), outside_weight)))
        self.counts: Counter[str] = Counter()

    def weights(self, image: np.ndarray, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        self.counts["learnt"] += 1
        return self._weights(tuple(out_hw or image.shape[:2]))

    def inside(self, hw: tuple[int, int]) -> np.ndarray:
        """Float32 0..1 at ``hw``, cached: read-only."""
        return self._inside(tuple(hw))

    def _resized(self, hw: tuple[int, int]) -> np.ndarray:
        return _frozen(cv2.resize(self.shape, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255)


class RateLimitedLog:
    """A warning at most every ``every_s`` seconds; the ones in between go to debug."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = -float("inf")

    def log(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        level = logging.WARNING if now - self._last >= self.every_s else logging.DEBUG
        if level == logging.WARNING:
            self._last = now
        log.log(level, message, *args)


# --- feature matching --------------------------------------------------------------------------

@dataclass
class _Reference:
    keypoints: np.ndarray    # (N, 2) float32 at the matching scale
    descriptors: np.ndarray | None
    scale: float             # matching scale / full reference size
    obj: np.ndarray          # uint8 0/255 object mask at the full reference size, dilated by the margin


class FeatureMask:
    """References' keypoints and descriptors are computed once, here; a frame costs one detection
    at the matching scale, one knn match per reference, RANSAC and one warp."""

    def __init__(self, cfg: MaskConfig, images: list[np.ndarray], objects: list[np.ndarray],
                 learnt: "LearntMask | None" = None) -> None:
        self.cfg = cfg
        self.learnt = learnt  # the fallback where a frame does not lock on; None: the whole frame
        self._warn = RateLimitedLog(_WARN_EVERY_S)
        self.detector, norm = _detector(cfg.detector, cfg.max_keypoints)
        self.matcher = cv2.BFMatcher(norm)
        self.references: list[_Reference] = []
        for img, obj in zip(images, objects):
            small, scale = _matching_view(img, cfg.match_side)
            pts, desc = self._features(small)
            if desc is None or len(pts) < cfg.min_matches:
                log.warning("mask reference with only %d keypoints: it can never give a homography", len(pts))
            self.references.append(_Reference(pts, desc, scale, _dilate(obj, cfg.margin)))
        self.counts: Counter[str] = Counter()   # frames per outcome: homography / learnt / all

    def weights(self, image: np.ndarray, out_hw: tuple[int, int] | None = None) -> np.ndarray:
        return _to_weights(self.locate(image, out_hw).mask, self.cfg.outside_weight)

    def locate(self, image: np.ndarray, out_hw: tuple[int, int] | None = None) -> Located:
        """Where the part is; the mask comes at ``out_hw`` (default: the frame's size), the
        homography maps reference pixels to frame pixels."""
        cfg, (fh, fw) = self.cfg, image.shape[:2]
        h, w = out_hw or (fh, fw)
        small, scale = _matching_view(image, cfg.match_side)
        pts, desc = self._features(small)
        best = (None, 0, np.zeros((0, 2), np.float32), None)  # reference, matches, inlier points, homography
        for i, ref in enumerate(self.references):
            src, dst = self._match(ref, pts, desc)
            if len(src) < 4:
                continue
            H, inl = cv2.findHomography(src, dst, cv2.RANSAC, _RANSAC_PX)
            inliers = dst[inl.ravel() > 0] if H is not None else dst[:0]
            if len(inliers) > len(best[2]):
                best = (i, len(src), inliers, H)
        i, matches, inliers, H = best

        if len(inliers) >= cfg.min_matches:
            ref = self.references[i]
            # Matching-scale homography -> full reference pixels to full frame pixels.
            full = np.diag([1 / scale, 1 / scale, 1.0]) @ H @ np.diag([ref.scale, ref.scale, 1.0])
            if _plausible(full, ref.obj.shape[:2]):
                to_out = np.diag([w / fw, h / fh, 1.0]) @ full
                warped = cv2.warpPerspective(ref.obj, to_out, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
                if warped.any():
                    return self._found(Located(warped.astype(np.float32) / 255.0, "homography", full, i,
                                               matches, len(inliers)))
        if self.learnt is not None:
            return self._found(Located(self.learnt.inside((h, w)), "learnt", None, i, matches, len(inliers)))
        return self._found(Located(np.ones((h, w), np.float32), "all", None, i, matches, len(inliers)))

    def _found(self, loc: Located) -> Located:
        self.counts[loc.how] += 1
        if loc.how != "homography":
            self._warn.log("object mask did not lock on (%d matches, %d inliers): %s; frames so far %s",
                           loc.matches, loc.inliers,
                           "the learnt mask" if loc.how == "learnt" else "the whole frame", dict(self.counts))
        return loc

    def _features(self, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        kps = self.detector.detect(grey, None)
        # AKAZE and BRISK have no keypoint limit of their own: keep the strongest.
        kps = sorted(kps, key=lambda k: -k.response)[: self.cfg.max_keypoints]
        kps, desc = self.detector.compute(grey, kps)
        pts = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        return pts, desc if desc is not None and len(desc) else None

    def _match(self, ref: _Reference, pts: np.ndarray, desc: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((0, 2), np.float32)
        if desc is None or ref.descriptors is None or len(desc) < 2:
            return empty, empty
        pairs = self.matcher.knnMatch(ref.descriptors, desc, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.cfg.ratio * p[1].distance]
        if not good:
            return empty, empty
        return (ref.keypoints[[m.queryIdx for m in good]], pts[[m.trainIdx for m in good]])


# --- loading --------------------------------------------------------------------------------------

def load_mask(cfg: MaskConfig, files: list[dict[str, Any]], bundle_dir: Path,
              learnt: str | None = None) -> ObjectMask:
    """The mask a bundle describes: its settings, for ``features`` its reference files, and the
    learnt shape (``learnt``, a bundle file) where calibration wrote one (all hash-checked)."""
    if cfg.kind == "roi":
        return RoiMask(cfg.polygons, cfg.outside_weight)
    if cfg.kind not in ("learnt", "features"):
        raise ValueError(f"mask.kind: expected roi, learnt or features, got {cfg.kind!r}")
    shape = LearntMask(_imread(Path(bundle_dir) / learnt), cfg.outside_weight) if learnt else None
    if cfg.kind == "learnt":
        if shape is None:
            raise ValueError(f"{bundle_dir}: the bundle's learnt mask has no file (mask_learnt)")
        return shape
    if not files:
        raise ValueError(f"{bundle_dir}: the bundle's mask has no reference files")
    images = [_imread(Path(bundle_dir) / f["image"]) for f in files]
    objects = [_imread(Path(bundle_dir) / f["object"]) for f in files]
    return FeatureMask(cfg, images, objects, shape)


def check_detector(name: str) -> None:
    """Refuse (ValueError) a detector this OpenCV build lacks, before any work depends on it."""
    _detector(name, 8)


# --- helpers ----------------------------------------------------------------------------------

def _detector(name: str, max_keypoints: int) -> tuple[Any, int]:
    # Detector thresholds are set low: machined and brushed surfaces are low-contrast (ORB's default
    # FAST threshold finds ~30 corners on the synthetic washer, 5 finds ~600); the strongest are kept.
    make = {"orb": ("ORB_create", lambda f: f(nfeatures=max_keypoints, fastThreshold=5), cv2.NORM_HAMMING),
            "sift": ("SIFT_create", lambda f: f(nfeatures=max_keypoints), cv2.NORM_L2),
            "akaze": ("AKAZE_create", lambda f: f(threshold=1e-4), cv2.NORM_HAMMING),
            "brisk": ("BRISK_create", lambda f: f(thresh=10), cv2.NORM_HAMMING)}
    if name not in make:
        raise ValueError(f"mask.detector: expected one of {', '.join(make)}, got {name!r}")
    attr, build, norm = make[name]
    # OpenCV 5 moved AKAZE and BRISK to the contrib modules (cv2.xfeatures2d); 4.x has them in cv2.
    factory = getattr(cv2, attr, None) or getattr(getattr(cv2, "xfeatures2d", None), attr, None)
    if factory is None:
        raise ValueError(f"mask.detector: {name!r} is not in this OpenCV build ({cv2.__version__}; OpenCV 5 keeps "
                         "AKAZE and BRISK in opencv-contrib-python-headless); use orb or sift, or install the "
                         "contrib wheel")
    return build(factory), norm


def _matching_view(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    scale = min(1.0, side / max(grey.shape[:2]))
    if scale < 1.0:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return grey, scale


def _plausible(H: np.ndarray, reference_hw: tuple[int, int]) -> bool:
    """A homography that keeps orientation, scales the part by at most _MAX_SCALE_CHANGE and bends
    the frame little; RANSAC on chance matches of a texture gives wild ones."""
    if not np.isfinite(H).all() or abs(H[2, 2]) < 1e-12:
        return False
    H = H / H[2, 2]
    det = float(np.linalg.det(H[:2, :2]))
    if not 1 / _MAX_SCALE_CHANGE ** 2 <= det <= _MAX_SCALE_CHANGE ** 2:
        return False
    h, w = reference_hw
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64)
    denom = corners @ H[2]
    return bool(denom.min() > 0 and denom.max() / denom.min() < 1.5)


def _dilate(mask: np.ndarray, margin: float) -> np.ndarray:
    r = int(round(margin * max(mask.shape[:2])))
    if r <= 0:
        return mask
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _to_weights(inside: np.ndarray, outside_weight: float) -> np.ndarray:
    return (outside_weight + (1.0 - outside_weight) * inside).astype(np.float32)


def _imread(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"{path}: cannot read object mask file")
    return img
