"""Synthetic inspection data: a brushed metal washer on a dark background, with defects.

The demo and the tests use it so that they need nothing from ``../shared``. Good parts vary
the way real line images do (texture noise, brightness, lighting gradient, a few pixels of
position jitter); defects differ from that variation in kind (a thin line across the brush
grain, a stain, a jagged crack), so a model fitted on good parts only can find them.
Every function is deterministic given its random generator or seed.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

DEFECT_KINDS = ("scratch", "spot", "crack")

# write_dataset shows a progress bar only above this many images: small sets finish at once.
_PROGRESS_MIN_IMAGES = 500


def synthetic_part(rng: np.random.Generator, size: tuple[int, int] = (256, 256),
                   defect: str | None = None, clutter: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One BGR uint8 image of ``size`` (height, width) and its bool defect mask.

    ``defect`` is None for a good part (all-False mask) or one of DEFECT_KINDS. ``clutter`` puts
    the part on a belt with loose debris (specks, chips, fibres) at random places around it, good
    parts included: not defects, but what a model sees off the part, which an object mask is for.
    """
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {defect!r} (expected one of {', '.join(DEFECT_KINDS)} or None)")
    h, w = size
    scale = min(h, w) / 256.0
    centre = np.array([w / 2, h / 2]) + rng.uniform(-4, 4, 2) * scale
    outer, inner = 0.42 * min(h, w), 0.12 * min(h, w)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.hypot(xx - centre[0], yy - centre[1])
    # Anti-aliased annulus: 1 on the part, 0 on the background and in the hole.
    part = np.clip(outer - dist + 0.5, 0, 1) * np.clip(dist - inner + 0.5, 0, 1)

    img = _background(rng, h, w) * (1 - part) + _metal(rng, h, w, scale, dist, outer, inner) * part
    mask = np.zeros((h, w), bool)
    if defect is not None:
        img, mask = _add_defect(rng, img, part, centre, outer, inner, scale, defect)
    if clutter:  # drawn last: the same seed gives the same part, with or without the belt's debris
        img = img + _debris(rng, (h, w), scale) * (1 - part)

    tint = np.array([1.0, 0.98, 0.94], np.float32)  # a slightly warm grey, as under LED light
    bgr = np.clip(img[..., None] * tint, 0, 255).astype(np.uint8)
    return bgr, mask


def write_dataset(root: Path, n_train: int = 60, n_test_good: int = 12, n_test_defect: int = 12,
                  size: tuple[int, int] = (256, 256), seed: int = 0,
                  progress: bool | None = None, clutter: bool = False) -> Path:
    """Write an MVTec-layout data set under ``root`` and return ``root``.

    ``root/train/good``, ``root/test/good``, ``root/test/<kind>`` and
    ``root/ground_truth/<kind>/<stem>_mask.png`` (0/255). The test defects cycle through
    DEFECT_KINDS. ``progress`` None shows a bar only for large sets; ``clutter``: see synthetic_part.
    """
    root = Path(root)
    jobs: list[tuple[Path, str | None, Path | None]] = []
    for i in range(n_train):
        jobs.append((root / "train" / "good" / f"{i:03d}.png", None, None))
    for i in range(n_test_good):
        jobs.append((root / "test" / "good" / f"{i:03d}.png", None, None))
    for i in range(n_test_defect):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        stem = f"{i // len(DEFECT_KINDS):03d}"
        jobs.append((root / "test" / kind / f"{stem}.png", kind, root / "ground_truth" / kind / f"{stem}_mask.png"))

    show = len(jobs) >= _PROGRESS_MIN_IMAGES if progress is None else progress
    # One independent stream per image: any image can be regenerated alone, same result.
    streams = np.random.SeedSequence(seed).spawn(len(jobs))
    for (path, kind, mask_path), stream in tqdm(zip(jobs, streams), total=len(jobs), disable=not show,
                                                desc="synthetic data", unit="img"):
        img, mask = synthetic_part(np.random.default_rng(stream), size, kind, clutter)
        _imwrite(path, img)
        if mask_path is not None:
            _imwrite(mask_path, mask.astype(np.uint8) * 255)
    return root


def _imwrite(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: cannot write image")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    level = rng.uniform(32, 42)
    return level + rng.normal(0, 2.5, (h, w)).astype(np.float32)


def _debris(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Loose specks, chips and fibres on the belt, a few per image, anywhere in the frame: the
    brightness they add (the part hides those that fall under it)."""
    h, w = shape
    layer = np.zeros((h, w), np.float32)
    for _ in range(rng.poisson(6)):
        at = rng.uniform((0, 0), (w, h))
        size = rng.uniform(1.5, 5.0) * scale
        if rng.random() < 0.3:  # a fibre: a thin bent line
            bend = rng.uniform(-0.5, 0.5)
            angle = rng.uniform(0, 2 * np.pi) + bend * np.linspace(0, 1, 6)
            length = size * rng.uniform(4, 8)
            steps = np.stack([np.cos(angle), np.sin(angle)], axis=1) * length / len(angle)
            points = at + np.cumsum(steps, axis=0)
            alpha = _polyline((h, w), points, thickness=1)
        else:  # a speck or chip: a small filled ellipse, soft-edged
            alpha = np.zeros((h, w), np.float32)
            axes = (max(1, int(round(size * 16))), max(1, int(round(size * rng.uniform(0.4, 1.0) * 16))))
            cv2.ellipse(alpha, (int(at[0] * 16), int(at[1] * 16)), axes, rng.uniform(0, 180), 0, 360, 1.0,
                        -1, cv2.LINE_AA, shift=4)
        np.maximum(layer, alpha * rng.uniform(40, 110), out=layer)
    return layer


def _metal(rng: np.random.Generator, h: int, w: int, scale: float,
           dist: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Brushed metal: streaks along x, fine grain, a lighting gradient and darker bevels."""
    level = 150 * rng.uniform(0.92, 1.08)
    streak_len = max(3, int(31 * scale)) | 1
    streaks = cv2.blur(rng.normal(0, 1, (h, w)).astype(np.float32), (streak_len, 1))
    streaks *= 7.0 / (streaks.std() + 1e-6)
    grain = rng.normal(0, 3.0, (h, w)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lighting = 10 * rng.uniform(0.5, 1.0) * ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))
    bevel_width = 5 * scale
    bevel = 25 * (np.clip(1 - (outer - dist) / bevel_width, 0, 1) + np.clip(1 - (dist - inner) / bevel_width, 0, 1))
    return level + streaks + grain + lighting - bevel


def _add_defect(rng: np.random.Generator, img: np.ndarray, part: np.ndarray, centre: np.ndarray,
                outer: float, inner: float, scale: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    # Redraw until the defect lands on the part with a useful area (rarely more than once).
    for _ in range(20):
        radius = rng.uniform(inner + 12 * scale, outer - 14 * scale)
        theta = rng.uniform(0, 2 * np.pi)
        at = centre + radius * np.array([np.cos(theta), np.sin(theta)])
        alpha, delta = _DRAW[kind](rng, img.shape, at, scale)
        alpha *= part > 0.99  # stays off the bevels and the background
        mask = alpha > 0.3
        if mask.sum() >= 12 * scale * scale:
            break
    # Dilated: a person outlining a defect includes its soft rim too.
    mask = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & (part > 0.99)
    return img + alpha * delta, mask


def _scratch(rng: np.random.Generator, shape: tuple[int, int], at: np.ndarray,
             scale: float) -> tuple[np.ndarray, float]:
    """A thin, slightly bent line, brighter or darker, fading at both ends."""
    length = rng.uniform(30, 60) * scale
    angle = rng.uniform(np.pi / 6, 5 * np.pi / 6) * rng.choice([-1, 1])  # across the brush grain
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    t = np.linspace(-0.5, 0.5, 12)
    bend = rng.uniform(-0.08, 0.08) * length * (1 - 4 * t ** 2)
    points = at + np.outer(t * length, direction) + np.outer(bend, normal)
    fade = np.sin(np.pi * (t[:-1] + t[1:] + 1) / 2) ** 0.5  # per segment, 0 towards both ends
    thickness = 1 if scale < 1.5 else 2
    alpha = np.zeros(shape, np.float32)
    for i, weight in enumerate(fade):
        np.maximum(alpha, weight * _polyline(shape, points[i:i + 2], thickness), out=alpha)
    delta = rng.uniform(45, 70) * rng.choice([-1, 1])
    return alpha, delta


def _spot(rng: np.random.Generator, shape: tuple[int, int], at: np.ndarray,
          scale: float) -> tuple[np.ndarray, float]:
    """An irregular stain with a soft edge."""
    angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    radii = rng.uniform(5, 10) * scale * (1 + 0.25 * rng.uniform(-1, 1, angles.size))
    outline = np.stack([radii * np.cos(angles), rng.uniform(0.6, 1.0) * radii * np.sin(angles)], axis=1)
    turn = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    points = at + outline @ rotation.T
    alpha = np.zeros(shape, np.float32)
    cv2.fillPoly(alpha, [np.round(points * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=4)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.2 * scale)
    delta = rng.uniform(40, 60) * (-1 if rng.random() < 0.7 else 1)
    return alpha, delta


def _crack(rng: np.random.Generator, shape: tuple[int, int], at: np.ndarray,
           scale: float) -> tuple[np.ndarray, float]:
    """A jagged dark polyline: a random walk with a persistent direction."""
    steps = rng.integers(7, 13)
    heading = rng.uniform(0, 2 * np.pi)
    points = [at]
    for _ in range(steps):
        heading += rng.normal(0, 0.6)
        points.append(points[-1] + rng.uniform(4, 8) * scale * np.array([np.cos(heading), np.sin(heading)]))
    points = np.array(points) - (points[-1] - points[0]) / 2  # centred on ``at``
    points += rng.normal(0, 0.8 * scale, points.shape)  # small kinks between the steps
    alpha = _polyline(shape, points, thickness=max(1, int(round(1.5 * scale))))
    return alpha, -rng.uniform(50, 75)


def _polyline(shape: tuple[int, int], points: np.ndarray, thickness: int) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.polylines(canvas, [np.round(points * 16).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255


_DRAW = {"scratch": _scratch, "spot": _spot, "crack": _crack}
