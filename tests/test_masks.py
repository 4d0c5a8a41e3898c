"""Object masks: ROI polygons, feature-matching alignment and its fallbacks, masked scoring
through both runtimes, and mask files under the bundle's hashes."""
from __future__ import annotations

import re

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.masks import fit_mask, reference_object
from engines.masks import FeatureMask, MaskConfig, RoiMask, load_mask
from calibration.synthetic import synthetic_part
from engines.bundle import BundleError, load_bundle, write_manifest
from conftest import pipeline

PARITY_RTOL = 1e-3   # as tests/test_padim.py: ONNX Runtime against the torch reference
ALIGN_PX = 3.0       # a recovered homography maps every frame corner within this of the truth
SIZE = (192, 224)    # height, width of the synthetic parts


def _part(seed: int) -> np.ndarray:
    return synthetic_part(np.random.default_rng(seed), SIZE)[0]


def _moved(image: np.ndarray, angle: float = 12.0, shift: tuple[float, float] = (9.0, -6.0),
           noise_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``image`` rotated about its centre and shifted (a known similarity), with sensor noise."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[:, 2] += shift
    moved = cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    noise = np.random.default_rng(noise_seed).normal(0, 2.0, moved.shape)
    return np.clip(moved + noise, 0, 255).astype(np.uint8), np.vstack([m, [0, 0, 1]])


def _write_refs(tmp_path: Path, images: list[np.ndarray]) -> list[Path]:
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / "good" / f"{i:03d}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(paths[-1]), img)
    return paths


def _feature_mask(tmp_path: Path, refs: list[np.ndarray], learnt: bool = True, **cfg: object) -> FeatureMask:
    bundle_dir = tmp_path / "bundle"
    settings = MaskConfig(kind="features", **cfg)
    fitted = fit_mask(settings, _write_refs(tmp_path, refs), bundle_dir)
    mask = load_mask(settings, fitted.references, bundle_dir, fitted.learnt if learnt else None)
    assert isinstance(mask, FeatureMask)
    return mask


def _corner_error(found: np.ndarray, truth: np.ndarray, hw: tuple[int, int]) -> float:
    h, w = hw
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float).T
    a, b = truth @ corners, found @ corners
    return float(np.abs(a[:2] / a[2] - b[:2] / b[2]).max())


# --- ROI polygons --------------------------------------------------------------------------------

def test_roi_polygon_zeroes_outside_and_is_rasterised_once_per_size():
    mask = load_mask(MaskConfig(kind="roi", polygons=[[[10, 5], [50, 5], [50, 30], [10, 30]]], outside_weight=0.0),
                     [], Path("."))
    frame = np.zeros((40, 60, 3), np.uint8)
    w = mask.weights(frame)
    assert w.shape == (40, 60) and w.dtype == np.float32
    assert (w[5:31, 10:51] == 1).all()
    outside = np.ones_like(w, bool)
    outside[5:31, 10:51] = False
    assert (w[outside] == 0).all()
    assert mask.weights(frame) is w                              # cached for this frame size
    assert mask.weights(np.zeros((80, 120), np.uint8)).shape == (80, 120)


def test_roi_outside_weight_keeps_a_share_of_the_score():
    mask = RoiMask([[[0, 0], [9, 0], [9, 9], [0, 9]]], outside_weight=0.25)
    w = mask.weights(np.zeros((20, 20), np.uint8))
    assert w[5, 5] == 1.0 and w[15, 15] == pytest.approx(0.25)


def test_roi_polygon_off_the_frame_is_a_clear_error():
    mask = RoiMask([[[500, 500], [600, 500], [600, 600]]], outside_weight=0.0)
    with pytest.raises(ValueError, match=r"mask.polygons: no polygon covers any pixel of a 60 x 40 frame"):
        mask.weights(np.zeros((40, 60), np.uint8))


@pytest.mark.parametrize("bad, key", [
    (dict(outside_weight=1.5), "mask.outside_weight"),
    (dict(kind="roi"), "mask.polygons"),
    (dict(polygons=[[[0, 0], [1, 1]]]), r"mask.polygons\[0\]"),
    (dict(min_matches=2), "mask.min_matches"),
])
def test_mask_config_names_the_bad_key(bad, key):
    from pydantic import ValidationError

    from agent.config import Config, describe

    with pytest.raises(ValidationError) as e:
        Config.model_validate({"model": {"mask": bad}})
    assert re.match(f"f.yaml: model.{key}: ", describe(e.value, "f.yaml")), describe(e.value, "f.yaml")


# --- feature matching ---------------------------------------------------------------------------

@pytest.mark.parametrize("detector", ["orb", "sift", "akaze", "brisk"])
def test_feature_mask_aligns_a_moved_part(tmp_path: Path, detector: str):
    ref = _part(3)
    mask = _feature_mask(tmp_path, [_part(7), ref], detector=detector, margin=0.0)
    frame, truth = _moved(ref)
    found = mask.locate(frame)
    assert found.how == "homography" and found.reference == 1
    assert _corner_error(found.homography, truth, SIZE) <= ALIGN_PX
    # The washer itself (Otsu on the reference), moved by the true transform, is what is kept.
    obj, how = reference_object(cv2.cvtColor(ref, cv2.COLOR_BGR2GRAY), mask.cfg)
    assert how == "otsu"
    expected = cv2.warpPerspective(obj, truth, (SIZE[1], SIZE[0]), flags=cv2.INTER_NEAREST) > 0
    kept = found.mask > 0.5
    assert (kept & expected).sum() / (kept | expected).sum() >= 0.97
    weights = mask.weights(frame)
    band = np.ones((5, 5), np.uint8)   # the warped outline is anti-aliased over a pixel or two
    core = cv2.erode(expected.astype(np.uint8), band) > 0
    away = cv2.dilate(expected.astype(np.uint8), band) == 0
    low = mask.cfg.outside_weight
    assert (weights[core] == 1.0).all() and np.allclose(weights[away], low)
    assert weights[0, 0] == pytest.approx(low) and weights[SIZE[0] // 2, SIZE[1] // 2] == pytest.approx(low)
    assert mask.counts["homography"] == 2


def test_reference_mask_from_polygons_and_whole_frame():
    grey = cv2.cvtColor(_part(3), cv2.COLOR_BGR2GRAY)
    obj, how = reference_object(grey, MaskConfig(kind="features", object="polygons",
                                                 polygons=[[[20, 20], [100, 20], [100, 80], [20, 80]]]))
    assert how == "polygons" and obj[50, 60] == 255 and obj[150, 200] == 0
    texture = np.random.default_rng(0).normal(128, 20, SIZE).clip(0, 255).astype(np.uint8)
    obj, how = reference_object(texture, MaskConfig(kind="features"))  # no part/background split
    assert how == "frame" and (obj == 255).all()


def test_a_frame_that_does_not_lock_on_falls_back_to_the_learnt_mask_not_a_hull(tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture):
    refs = [_part(s) for s in (3, 4, 5, 6)]
    # An unreachable homography requirement: many inliers, yet no lock.
    mask = _feature_mask(tmp_path, refs, min_matches=100_000)
    frame, _ = _moved(refs[0], angle=0.0, shift=(2.0, -1.0))
    with caplog.at_level("DEBUG", logger="engines.masks"):
        found = [mask.locate(frame) for _ in range(3)]
    assert all(f.how == "learnt" and f.homography is None for f in found) and found[0].inliers >= 8
    # The whole washer is kept (the learnt shape), not the few matched points' region.
    obj, _ = reference_object(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), mask.cfg)
    assert (found[0].mask[obj > 0] > 0.5).mean() >= 0.99
    assert found[0].mask[0, 0] == 0 and found[0].mask[SIZE[0] // 2, SIZE[1] // 2] == 0  # background, hole
    assert mask.counts == {"learnt": 3}
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "did not lock on" in r.message]
    assert len(warnings) == 1   # one warning a minute; the counts tell the rest


@pytest.mark.parametrize("what", ["another part", "a blank frame"])
def test_fallback_to_the_whole_frame_without_a_learnt_mask(tmp_path: Path, what: str):
    mask = _feature_mask(tmp_path, [_part(3)], learnt=False)
    # Synthetic parts have random brushing: another part shares no keypoints with the reference.
    frame = _part(11) if what == "another part" else np.full((*SIZE, 3), 90, np.uint8)
    found = mask.locate(frame)
    assert found.how == "all"
    assert (mask.weights(frame) == 1.0).all()
    assert mask.counts == {"all": 2}


# --- in the bundle and the scorer -----------------------------------------------------------------

@pytest.fixture
def masked_bundle(padim_bundle, tmp_path: Path):
    """The session's PaDiM bundle with a feature mask fitted on two of its good images."""
    out = tmp_path / "masked"
    shutil.copytree(padim_bundle.path, out)
    refs = _write_refs(tmp_path, [_resized_part(3), _resized_part(5)])
    manifest = padim_bundle.manifest.model_copy(deep=True)
    manifest.model.mask = MaskConfig(kind="features", references=2, outside_weight=0.0)
    fitted = fit_mask(manifest.model.mask, refs, out)
    manifest.mask_files, manifest.mask_learnt = fitted.references, fitted.learnt
    write_manifest(out, manifest)
    return load_bundle(out), refs


def _resized_part(seed: int) -> np.ndarray:
    return synthetic_part(np.random.default_rng(seed), (160, 192))[0]  # the sample_data size


def test_masked_bundle_scores_alike_with_torch_and_onnxruntime(masked_bundle):
    bundle, refs = masked_bundle
    frame, _ = _moved(cv2.imread(str(refs[1])), angle=-8.0, shift=(5.0, 4.0))
    plain = pipeline(bundle, use_mask=False).score_frame(frame)
    torch_scorer = pipeline(bundle)
    ref = torch_scorer.score_frame(frame)
    ort = pipeline(bundle, "onnxruntime").score_frame(frame)
    weights = torch_scorer.mask.weights(frame, ref.map.shape)
    assert torch_scorer.mask.counts["homography"] == 2   # both calls above found the part
    assert 0.2 < weights.mean() < 0.8                     # the mask keeps the part, drops the background
    np.testing.assert_allclose(ref.map, plain.map * weights, rtol=1e-6)
    assert (ref.map[weights == 0] == 0).all() and (plain.map[weights == 0] > 0).all()
    assert ref.score == pytest.approx(float(ref.map.max())) and ref.score <= plain.score
    assert "mask" in ref.timings_ms
    np.testing.assert_allclose(ort.score, ref.score, rtol=PARITY_RTOL)
    np.testing.assert_allclose(ort.map, ref.map, rtol=PARITY_RTOL, atol=PARITY_RTOL * ref.score)


def test_mask_files_are_covered_by_the_bundle_hashes(masked_bundle):
    bundle, _ = masked_bundle
    assert {"mask/ref_0.png", "mask/object_0.png", "mask/ref_1.png", "mask/object_1.png"} <= set(bundle.manifest.files)
    ref0 = bundle.path / "mask" / "ref_0.png"
    img = cv2.imread(str(ref0), cv2.IMREAD_GRAYSCALE)
    img[0, 0] ^= 0xFF
    cv2.imwrite(str(ref0), img)
    with pytest.raises(BundleError, match=r"mask/ref_0.png: content hash mismatch"):
        load_bundle(bundle.path)


# --- a part with a piece missing, and the learnt mask ---------------------------------------------

def _missing_piece(image: np.ndarray, angle: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with a wedge of the washer cut away (background showing), and where the piece was."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    theta = np.degrees(np.arctan2(yy - h / 2, xx - w / 2)) % 360
    wedge = (theta >= angle) & (theta < angle + 40)
    obj, _ = reference_object(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), MaskConfig(kind="learnt"))
    piece = wedge & (cv2.erode(obj, np.ones((5, 5), np.uint8)) > 0)
    out = image.copy()
    out[cv2.dilate(piece.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0] = 37  # the dark background
    return out, piece


def test_the_learnt_mask_covers_the_part_and_a_missing_piece(tmp_path: Path):
    goods = [_part(s) for s in range(20, 28)]
    settings = MaskConfig(kind="learnt")
    fitted = fit_mask(settings, _write_refs(tmp_path, goods), tmp_path / "bundle")
    assert fitted.references == [] and fitted.learnt == "mask/learnt.png"
    mask = load_mask(settings, [], tmp_path / "bundle", fitted.learnt)
    frame, piece = _missing_piece(_part(40))
    # The part as seen on this frame lacks the piece: a mask found on the frame would cut it away.
    seen, _ = reference_object(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), settings)
    assert (seen[piece] > 0).mean() < 0.2
    weights = mask.weights(frame)
    assert (weights[piece] == 1.0).mean() >= 0.99                         # the missing piece is scored
    whole, _ = reference_object(cv2.cvtColor(_part(41), cv2.COLOR_BGR2GRAY), settings)
    assert (weights[whole > 0] == 1.0).mean() >= 0.99                     # and the whole part
    assert weights[0, 0] == pytest.approx(0.7) and weights[SIZE[0] // 2, SIZE[1] // 2] == pytest.approx(0.7)
    assert mask.counts == {"learnt": 1}


def test_a_texture_learns_the_whole_frame(tmp_path: Path):
    textures = [np.random.default_rng(s).normal(128, 20, (*SIZE, 3)).clip(0, 255).astype(np.uint8) for s in range(4)]
    fitted = fit_mask(MaskConfig(kind="learnt"), _write_refs(tmp_path, textures), tmp_path / "bundle")
    assert (cv2.imread(str(tmp_path / "bundle" / fitted.learnt), cv2.IMREAD_GRAYSCALE) == 255).all()


@pytest.mark.parametrize("detector", ["orb", "akaze"])
def test_a_homography_keeps_a_missing_piece_inside_the_mask(tmp_path: Path, detector: str):
    ref = _part(3)
    mask = _feature_mask(tmp_path, [ref], detector=detector, margin=0.0)
    broken, _ = _missing_piece(ref)
    _, piece = _missing_piece(ref)
    frame, truth = _moved(broken)
    moved_piece = cv2.warpPerspective(piece.astype(np.uint8), truth, (SIZE[1], SIZE[0]),
                                      flags=cv2.INTER_NEAREST) > 0
    found = mask.locate(frame)
    assert found.how == "homography"
    assert (found.mask[cv2.erode(moved_piece.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0] > 0.5).mean() >= 0.99


def test_the_learnt_mask_lifts_pixel_aupr_on_a_cluttered_belt(tmp_path: Path):
    """Debris on the belt around the part is no defect but scores like one: the learnt mask (weight
    0.7) keeps the whole part and every defect pixel, and lifts pixel AUPR over the same model
    unmasked (docs/configuration.md has the study at 256 px)."""
    from calibration.calibrate import calibrate
    from calibration.evaluate import evaluate
    from calibration.synthetic import write_dataset
    from conftest import small_model_config

    data = write_dataset(tmp_path / "belt", n_train=30, n_test_good=6, n_test_defect=12, size=(160, 192),
                         seed=4, clutter=True)
    bundle = calibrate(data, tmp_path / "b", small_model_config(mask=MaskConfig(kind="learnt")), progress=False)
    result = evaluate(bundle, pipeline(bundle), data, progress=False)
    assert result.mask["outcomes"] == {"learnt": 18}
    learnt = cv2.imread(str(bundle.path / bundle.manifest.mask_learnt), cv2.IMREAD_GRAYSCALE) > 0
    truth = np.stack([cv2.resize(m.astype(np.uint8), learnt.shape[::-1], interpolation=cv2.INTER_NEAREST)
                      for m in result.masks]) > 0
    assert learnt[None].repeat(len(truth), 0)[truth].all()              # every defect pixel is scored
    without = result.mask["without_mask"]["pixel_aupr"]
    assert result.metrics["overall"].pixel_aupr > without + 0.005, (result.metrics["overall"].pixel_aupr, without)


# --- AKAZE and BRISK through the CLI; an unavailable detector refused first ------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("detector", ["akaze", "brisk"])
def test_akaze_and_brisk_calibrate_and_evaluate_through_the_cli(tmp_path: Path, sample_data: Path, detector: str):
    import json
    import subprocess
    import sys

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  method: {kind: padim, dims: 48}\n  input_size: [128, 128]\n"
                      f"  mask: {{kind: features, detector: {detector}, references: 2}}\n")
    run = lambda *args: subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(config)],  # noqa: E731
                                       capture_output=True, text=True, cwd=REPO, timeout=300)
    r = run("calibrate", "--data", str(sample_data), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest.model.mask.detector == detector and len(bundle.manifest.mask_files) == 2
    assert bundle.manifest.mask_learnt == "mask/learnt.png"
    r = run("evaluate", "--model", str(tmp_path / "b"), "--data", str(sample_data), "--json", "--backend",
            "onnxruntime")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    mask = summary["mask"]
    assert mask["kind"] == "features" and sum(mask["outcomes"].values()) == summary["n_images"]
    # The synthetic parts' brushing is random per part, so frames fall back to the learnt shape.
    assert set(mask["outcomes"]) <= {"homography", "learnt"}
    assert mask["without_mask"]["n_images"] == summary["n_images"] and mask["without_mask"]["pixel_aupr"] > 0


def test_check_config_refuses_an_unavailable_detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from agent.config import ConfigError, load_config, preflight

    for where in (cv2, getattr(cv2, "xfeatures2d", None)):
        if where is not None and hasattr(where, "BRISK_create"):
            monkeypatch.delattr(where, "BRISK_create")
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  mask:\n    kind: features\n    detector: brisk\n")
    with pytest.raises(ConfigError, match=r"model.mask.detector: 'brisk' is not in this OpenCV build .*contrib"):
        preflight(load_config(path), path, serving=False)
