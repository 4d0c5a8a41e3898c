"""Synthetic defects on good images, for detection-rate estimates and thresholds without real defects.

Five kinds, used in turn so a set of ``n`` holds each about equally:

- "cutpaste" (Li et al. 2021): a rectangle cut from the image, colour-jittered, pasted elsewhere.
- "scar": CutPaste-scar, a thin long rotated strip, jittered and pasted.
- "nsa" (Schlueter et al. 2022, Natural Synthetic Anomalies): a patch from *another* good image,
  resized, Poisson-blended (``cv2.seamlessClone``) at a different place, so its edges vanish and
  only its content differs, like a real surface defect.
- "crack": a thin wandering line (1-3 px), darker or brighter than the surface by a few times
  the image's own grey-level spread.
- "spot": a small soft blob (a pore, a blowhole, a stain) at the same contrast.

The first three are large and often obvious; real defects on MTD's tiles, KSDD's commutators and
the synthetic washer are mostly thin or small and faint, and a ranking on large pasted patches
alone chose settings that lost on real defects (docs/engines.md). The last two are sized and
contrasted like those, relative to the image, never to a data set.

Every function is deterministic given its random generator. Images are BGR uint8 (a grey
image is handled as three equal channels and returned as it came); masks are bool, True where
the image was altered.
"""
from __future__ import annotations

import cv2
import numpy as np

KINDS = ("cutpaste", "scar", "nsa", "crack", "spot")


def synthesize_defects(images: list[np.ndarray], n: int,
                       rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (defective image, bool mask) pairs made from ``images`` (good parts), kinds in turn."""
    if not images:
        raise ValueError("synthesize_defects needs at least one good image")
    out = []
    for i in range(n):
        target = int(rng.integers(len(images)))
        kind = KINDS[i % len(KINDS)]
        if kind == "cutpaste":
            out.append(cutpaste(images[target], rng))
        elif kind == "scar":
            out.append(cutpaste_scar(images[target], rng))
        elif kind == "crack":
            out.append(crack(images[target], rng))
        elif kind == "spot":
            out.append(spot(images[target], rng))
        else:
            # Another good image where there is one: NSA blends content the target does not have.
            others = [j for j in range(len(images)) if j != target] or [target]
            out.append(nsa(images[target], images[others[int(rng.integers(len(others)))]], rng))
    return out


def cutpaste(image: np.ndarray, rng: np.random.Generator,
             area: tuple[float, float] = (0.02, 0.15)) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle of ``area`` (share of the image) and aspect 0.3-3.3, jittered, pasted elsewhere."""
    img = _bgr(image)
    h, w = img.shape[:2]
    share = rng.uniform(*area)
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    ph = int(np.clip(round(np.sqrt(share * h * w * aspect)), 2, h - 1))
    pw = int(np.clip(round(np.sqrt(share * h * w / aspect)), 2, w - 1))
    patch = _jitter(_crop(img, ph, pw, rng), rng)
    y, x = _place(h, w, ph, pw, rng)
    out = img.copy()
    out[y:y + ph, x:x + pw] = patch
    mask = np.zeros((h, w), bool)
    mask[y:y + ph, x:x + pw] = True
    return _like(out, image), mask


def cutpaste_scar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin strip (2-16 px by 10-25 px at 256 px, scaled to the image) rotated -45..45 degrees."""
    img = _bgr(image)
    h, w = img.shape[:2]
    scale = min(h, w) / 256.0
    sw = max(2, int(round(rng.uniform(2, 16) * scale)))
    sl = max(sw + 1, int(round(rng.uniform(10, 25) * scale)))
    strip = _jitter(_crop(img, sl, sw, rng), rng)
    # Rotate the strip and its mask on a canvas large enough for any angle.
    side = int(np.ceil(np.hypot(sl, sw))) + 2
    canvas = np.zeros((side, side, 3), np.uint8)
    cmask = np.zeros((side, side), np.uint8)
    oy, ox = (side - sl) // 2, (side - sw) // 2
    canvas[oy:oy + sl, ox:ox + sw] = strip
    cmask[oy:oy + sl, ox:ox + sw] = 255
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), float(rng.uniform(-45, 45)), 1.0)
    canvas = cv2.warpAffine(canvas, rot, (side, side), flags=cv2.INTER_LINEAR)
    cmask = cv2.warpAffine(cmask, rot, (side, side), flags=cv2.INTER_NEAREST) > 127
    side_h, side_w = min(side, h), min(side, w)
    canvas, cmask = canvas[:side_h, :side_w], cmask[:side_h, :side_w]
    y, x = _place(h, w, side_h, side_w, rng)
    out = img.copy()
    region = out[y:y + side_h, x:x + side_w]
    region[cmask] = canvas[cmask]
    mask = np.zeros((h, w), bool)
    mask[y:y + side_h, x:x + side_w] = cmask
    return _like(out, image), mask


def nsa(image: np.ndarray, source: np.ndarray, rng: np.random.Generator,
        side: tuple[float, float] = (0.1, 0.35)) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``source`` (sides ``side`` of the image's), Poisson-blended into ``image``."""
    img = _bgr(image)
    h, w = img.shape[:2]
    src = cv2.resize(_bgr(source), (w, h), interpolation=cv2.INTER_AREA)
    # seamlessClone needs a margin of a pixel or two around the patch inside the image.
    ph = int(np.clip(round(rng.uniform(*side) * h), 3, h - 4))
    pw = int(np.clip(round(rng.uniform(*side) * w), 3, w - 4))
    sy, sx = _place(h, w, ph, pw, rng)
    patch = src[sy:sy + ph, sx:sx + pw]
    patch = cv2.flip(patch, int(rng.integers(-1, 2)))  # -1, 0, 1: both axes, vertical, horizontal
    y = int(rng.integers(2, h - ph - 1))
    x = int(rng.integers(2, w - pw - 1))
    patch_mask = np.full((ph, pw), 255, np.uint8)
    centre = (x + pw // 2, y + ph // 2)
    out = cv2.seamlessClone(patch, img, patch_mask, centre, cv2.NORMAL_CLONE)
    mask = np.zeros((h, w), bool)
    # seamlessClone places the patch's centre at ``centre`` (odd sizes round down).
    top, left = centre[1] - ph // 2, centre[0] - pw // 2
    mask[top:top + ph, left:left + pw] = True
    return _like(out, image), mask


def crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random-walk line 10-45 % of the shorter side long, 1-3 px wide at 256 px, shaded by ``_shade``."""
    img = _bgr(image)
    h, w = img.shape[:2]
    scale = min(h, w) / 256.0
    step = max(1.0, 3.0 * scale)
    n = max(2, int(rng.uniform(0.10, 0.45) * min(h, w) / step))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.3, n))
    start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    points = start + np.cumsum(step * np.stack([np.cos(heading), np.sin(heading)], 1), 0)
    alpha = np.zeros((h, w), np.uint8)
    width = max(1, int(round(rng.uniform(1, 3) * scale)))
    cv2.polylines(alpha, [np.round(points).astype(np.int32)], False, 255, width, cv2.LINE_AA)
    return _shade(img, image, alpha, rng)


def spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft ellipse of radius 2-10 px at 256 px (axes ratio 0.5-1), shaded by ``_shade``."""
    img = _bgr(image)
    h, w = img.shape[:2]
    scale = min(h, w) / 256.0
    r = max(1.5, rng.uniform(2, 10) * scale)
    alpha = np.zeros((h, w), np.uint8)
    centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
    axes = (max(1, int(round(r))), max(1, int(round(r * rng.uniform(0.5, 1.0)))))
    cv2.ellipse(alpha, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.5, r / 3))  # soft edges, as a pore or a stain
    alpha[alpha < 26] = 0  # the blur's far tail (under 10 %) would change pixels no mask accounts for
    return _shade(img, image, alpha, rng)


def _shade(img: np.ndarray, original: np.ndarray, alpha: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``img`` darkened or brightened where ``alpha`` (uint8 coverage) is set; the mask is coverage >= 50 %."""
    if alpha.max() < 128:  # drawn off the image: put a dot at the centre so the defect exists
        alpha[alpha.shape[0] // 2, alpha.shape[1] // 2] = 255
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    # A few times the image's own spread, so a faint defect on a busy texture stays faint; a
    # floor of 12 grey levels so a flat surface still gets a visible one.
    delta = rng.choice([-1.0, 1.0]) * max(12.0, rng.uniform(2.0, 5.0) * float(grey.std()))
    out = np.clip(img.astype(np.float32) + (alpha.astype(np.float32) / 255.0 * delta)[..., None], 0, 255)
    return _like(out.astype(np.uint8), original), alpha >= 128


def _crop(img: np.ndarray, ph: int, pw: int, rng: np.random.Generator) -> np.ndarray:
    y, x = _place(img.shape[0], img.shape[1], ph, pw, rng)
    return img[y:y + ph, x:x + pw]


def _place(h: int, w: int, ph: int, pw: int, rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))


def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness and contrast jitter (CutPaste's colour jitter, 0.1 each), per patch."""
    gain = rng.uniform(0.9, 1.1)
    offset = rng.uniform(-0.1, 0.1) * 255
    mean = patch.mean()
    return np.clip((patch.astype(np.float32) - mean) * gain + mean + offset, 0, 255).astype(np.uint8)


def _bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected a BGR or grey uint8 image, got shape {image.shape} dtype {image.dtype}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is too small for synthetic defects (>= 16 px)")
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def _like(out: np.ndarray, original: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(out, cv2.COLOR_BGR2GRAY) if original.ndim == 2 else out
