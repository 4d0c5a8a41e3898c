"""The synthetic data generator: images, masks, the MVTec layout, determinism, detectability."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from calibration import data  # not ``from ... import test_samples``: pytest would collect it as a test
from calibration.synthetic import DEFECT_KINDS, synthetic_part, write_dataset


def test_good_part_is_bgr_with_an_empty_mask():
    img, mask = synthetic_part(np.random.default_rng(0), (200, 240))
    assert img.shape == (200, 240, 3) and img.dtype == np.uint8
    assert mask.shape == (200, 240) and mask.dtype == bool and not mask.any()
    # A bright part on a dark background, not a flat or saturated image.
    centre, corner = img[80:120, 40:60].mean(), img[:15, :15].mean()
    assert centre > corner + 60
    assert 0 < img.min() and img.max() < 255


def test_good_parts_vary_like_line_images():
    parts = [synthetic_part(np.random.default_rng(s))[0].astype(np.float32) for s in range(6)]
    means = [p.mean() for p in parts]
    assert max(means) - min(means) > 1.0                      # brightness varies...
    assert max(means) / min(means) < 1.2                      # ...but within a normal range
    assert all(np.abs(parts[0] - p).mean() > 2 for p in parts[1:])  # texture differs per sample


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_only_the_masked_pixels_visibly(kind):
    good, _ = synthetic_part(np.random.default_rng(7), defect=None)
    bad, mask = synthetic_part(np.random.default_rng(7), defect=kind)  # same texture, same seed
    assert 20 <= mask.sum() <= 3000
    diff = np.abs(bad.astype(np.float32) - good.astype(np.float32)).max(axis=2)
    near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert diff[~near].max() <= 3          # nothing changes away from the mask
    assert diff[mask].max() >= 30          # the defect stands out of the texture noise
    assert diff[mask].mean() >= 8


def test_unknown_defect_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="'dent'"):
        synthetic_part(np.random.default_rng(0), defect="dent")


def test_write_dataset_writes_mvtec_layout_that_calibration_reads(tmp_path):
    root = write_dataset(tmp_path / "ds", n_train=5, n_test_good=2, n_test_defect=6, size=(96, 128), seed=1)
    assert len(data.train_samples(root)) == 5
    samples = data.test_samples(root)
    kinds = sorted(s.defect_type for s in samples)
    assert kinds == ["crack", "crack", "good", "good", "scratch", "scratch", "spot", "spot"]
    for s in samples:
        img = data.read_image(s.path)
        assert img.shape == (96, 128, 3)
        mask = data.read_mask(s, img.shape[:2])
        assert mask.any() == (s.defect_type != "good")
        if s.mask_path is not None:
            assert s.mask_path == root / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
            assert set(np.unique(cv2.imread(str(s.mask_path), cv2.IMREAD_GRAYSCALE))) == {0, 255}


def test_write_dataset_is_deterministic_from_the_seed(tmp_path):
    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    a = contents(write_dataset(tmp_path / "a", 3, 1, 3, size=(64, 64), seed=5))
    b = contents(write_dataset(tmp_path / "b", 3, 1, 3, size=(64, 64), seed=5))
    c = contents(write_dataset(tmp_path / "c", 3, 1, 3, size=(64, 64), seed=6))
    assert a == b
    assert a.keys() == c.keys() and a != c


def _patch_features(path: Path) -> np.ndarray:
    """Local brightness, high-pass energy and gradient energy on a 4-px grid of 8x8 windows."""
    g = cv2.cvtColor(data.read_image(path), cv2.COLOR_BGR2GRAY).astype(np.float32)
    high = g - cv2.GaussianBlur(g, (0, 0), 3)
    maps = (g, high, high * high, cv2.Sobel(g, cv2.CV_32F, 0, 1) ** 2, cv2.Sobel(g, cv2.CV_32F, 1, 0) ** 2)
    return np.stack([cv2.blur(m, (8, 8))[4::4, 4::4] for m in maps], -1).reshape(-1, len(maps))


def test_defects_are_found_by_a_model_of_good_parts_only(tmp_path):
    # A crude patch-statistics kNN stands in for PaDiM: if it separates the defects, the
    # defects differ from normal variation in kind, not just in being absent from train.
    root = write_dataset(tmp_path / "ds", n_train=20, n_test_good=12, n_test_defect=12, size=(128, 128), seed=2)
    train = np.concatenate([_patch_features(s.path) for s in data.train_samples(root)])
    mu, sd = train.mean(0), train.std(0) + 1e-6
    nn = NearestNeighbors(n_neighbors=1).fit((train - mu) / sd)
    samples = data.test_samples(root)
    scores = [nn.kneighbors((_patch_features(s.path) - mu) / sd)[0].max() for s in samples]
    assert roc_auc_score([s.label for s in samples], scores) >= 0.8  # 0.83-1.0 over seeds 0-5; PaDiM does better


def test_clutter_adds_debris_off_the_part_only():
    plain, mask = synthetic_part(np.random.default_rng(5), defect="spot")
    cluttered, same_mask = synthetic_part(np.random.default_rng(5), defect="spot", clutter=True)
    assert (mask == same_mask).all()                                # the defect is the same
    diff = np.abs(cluttered.astype(np.float32) - plain.astype(np.float32)).max(axis=2)
    h, w = diff.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(xx - w / 2, yy - h / 2)
    on_part = (dist < 0.42 * min(h, w) - 6) & (dist > 0.12 * min(h, w) + 6)  # clear of the +-4 px jitter
    assert diff[on_part].max() == 0                                 # the part is untouched...
    assert (diff[~on_part] > 30).sum() >= 10                        # ...the belt around it is not
