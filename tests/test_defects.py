"""Synthetic defects: where they change the image, that NSA takes content from another image, determinism."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from calibration.defects import KINDS, crack, cutpaste, cutpaste_scar, nsa, spot, synthesize_defects
from calibration.synthetic import synthetic_part


def _goods(n: int = 3, size: tuple[int, int] = (96, 120)) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [synthetic_part(rng, size)[0] for _ in range(n)]


@pytest.mark.parametrize("make", [cutpaste, cutpaste_scar])
def test_cutpaste_changes_only_inside_its_mask(make) -> None:
    image = _goods(1)[0]
    for seed in range(20):
        out, mask = make(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.dtype == bool
        assert mask.any() and not mask.all()
        np.testing.assert_array_equal(out[~mask], image[~mask])
        assert (out[mask] != image[mask]).any()


def test_scar_is_thin() -> None:
    image = _goods(1, (256, 256))[0]
    for seed in range(10):
        _, mask = cutpaste_scar(image, np.random.default_rng(seed))
        # Width 2-16 px and length 10-25 px at 256 px: never more than a 16 x 25 strip.
        assert 0 < mask.sum() <= 16 * 25 + 40  # rotation rounding adds a rim


@pytest.mark.parametrize("make", [crack, spot])
def test_cracks_and_spots_are_small_faint_and_inside_their_masks(make) -> None:
    image = _goods(1, (256, 256))[0]
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    for seed in range(20):
        out, mask = make(image, np.random.default_rng(seed))
        assert out.shape == image.shape and mask.dtype == bool and mask.any()
        # Small: a crack is at most 3 px wide (5 with its anti-aliased rim) and 45 % of the side long,
        # a spot 10 px in radius.
        assert mask.sum() <= (0.45 * 256 * 5 if make is crack else np.pi * 10 ** 2)
        diff = np.abs(cv2.cvtColor(out, cv2.COLOR_BGR2GRAY).astype(np.float32) - grey)
        assert (diff[mask] > 0).mean() > 0.5
        # Faint: a shift of 2-5 times the image's spread (at least 12 levels), not a pasted patch.
        shift = diff[mask].max()
        assert 6 <= shift <= max(12.0, 5 * grey.std()) + 1
        # The mask is the half-coverage line: past a few pixels of it only a blurred rim's tail is
        # left, under 10 % of the shift (15 %: the shift seen inside may be clipped at 0 or 255).
        near = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9))).astype(bool)
        assert diff[~near].max(initial=0) <= 0.15 * shift + 1


def test_nsa_blends_content_from_the_other_image() -> None:
    dark = np.full((80, 100, 3), 40, np.uint8)
    stripes = dark.copy()
    stripes[::4] = 220  # content the target does not have
    out, mask = nsa(dark, stripes, np.random.default_rng(0))
    assert mask.sum() >= 9 and not mask.all()
    inside = out[mask].astype(np.float32)
    assert inside.std() > 20  # the stripes came across (Poisson blending keeps gradients)
    np.testing.assert_array_equal(out[~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3))).astype(bool)],
                                  dark[~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3))).astype(bool)])


def test_synthesize_defects_is_deterministic_and_cycles_kinds() -> None:
    goods = _goods()
    a = synthesize_defects(goods, 7, np.random.default_rng(5))
    b = synthesize_defects(goods, 7, np.random.default_rng(5))
    assert len(a) == 7 and len(KINDS) == 5
    for (ia, ma), (ib, mb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    c = synthesize_defects(goods, 7, np.random.default_rng(6))
    assert any((ia != ic).any() for (ia, _), (ic, _) in zip(a, c))


def test_grey_images_come_back_grey() -> None:
    grey = cv2.cvtColor(_goods(1)[0], cv2.COLOR_BGR2GRAY)
    for img, mask in synthesize_defects([grey, grey.copy()], 3, np.random.default_rng(0)):
        assert img.shape == grey.shape and mask.shape == grey.shape and mask.any()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one good image"):
        synthesize_defects([], 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        cutpaste(np.zeros((64, 64, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="too small"):
        cutpaste(np.zeros((8, 64, 3), np.uint8), np.random.default_rng(0))
