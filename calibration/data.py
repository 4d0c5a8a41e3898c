"""Reading MVTec-layout folders: train/good, test/<type>, ground_truth/<type>/<stem>_mask.png."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    path: Path
    defect_type: str          # "good" for normal images
    mask_path: Path | None    # None for good images (and for a defect without a mask file)

    @property
    def label(self) -> int:
        return 0 if self.defect_type == "good" else 1


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def train_samples(root: Path) -> list[Sample]:
    folder = Path(root) / "train" / "good"
    if not folder.is_dir():
        raise DataError(f"{root}: no train/good folder (expected MVTec layout)")
    samples = [Sample(p, "good", None) for p in list_images(folder)]
    if not samples:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def test_samples(root: Path) -> list[Sample]:
    test = Path(root) / "test"
    if not test.is_dir():
        raise DataError(f"{root}: no test folder (expected MVTec layout)")
    samples = []
    for type_dir in sorted(d for d in test.iterdir() if d.is_dir()):
        for p in list_images(type_dir):
            mask = None
            if type_dir.name != "good":
                mask = Path(root) / "ground_truth" / type_dir.name / f"{p.stem}_mask.png"
                mask = mask if mask.exists() else None
            samples.append(Sample(p, type_dir.name, mask))
    if not samples:
        raise DataError(f"{test}: no images")
    return samples


def read_image(path: Path) -> np.ndarray:
    """BGR uint8 (grey images are expanded to three channels)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot read image (missing, corrupt or unsupported format)")
    return img


def read_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask of the image's size; all False for good images or a missing mask file."""
    if sample.mask_path is None:
        return np.zeros(shape, bool)
    m = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{sample.mask_path}: cannot read mask")
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m > 127
