"""Calibrating a product: fit on good images, export the engine, set the thresholds, write the bundle.

    train/good -> fit split + held-out split (model.holdout, seeded)
    fit split  -> the method's fit (engines/methods/<method>): engine weights, head statistics
    the score path (engine, head, upsample, blur) -> model.onnx: uint8 tiles in, maps and
                  image scores out, the head statistics as inputs (engines/score.py)
    held out   -> scored through the same Pipeline as the line: the image threshold (policy on
                  their image scores), the pixel threshold (a quantile of their map values),
                  and the median good score (the normalised score's zero)

The bundle is written beside ``out`` and swapped in only once it loads as the agent will load
it: a calibration that fails half-way leaves the bundle the line runs untouched.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.data import read_image, train_samples
from calibration.images import TrainImages
from calibration.settings import ModelConfig
from calibration.thresholds import choose_threshold, pixel_threshold
from engines.bundle import MANIFEST, ONNX, Bundle, Manifest, load_bundle, write_manifest, write_tensors
from engines.decision import Decision
from engines.methods import FitContext, TrainedSettings, ValidationSet, implementation
from engines.model import ModelSpec
from engines.pipeline import Pipeline, model_inputs
from engines.runtimes.torch_backend import TorchBackend, TorchSettings
from engines.score import build_score_graph, export_score_onnx
from engines.tiling import make_grid

log = logging.getLogger(__name__)

# The decision needs a threshold above the median good score; until the thresholds exist, the
# pipeline scores the held-out images against this placeholder (never written to a bundle).
_UNDECIDED = Decision(image_threshold=1.0, pixel_threshold=1.0, center=0.0, policy="none", false_reject_rate=0.0,
                      pixel_quantile=1.0)


# Frames squeezed more than this into the model input lose thin defects along the squeezed axis:
# KolektorSDD's 1250 x 500 frames in 256 x 256 gave PaDiM a pixel AUPR of 0.10 on its test set,
# 0.22 at [640, 256] (docs/engines.md).
_SQUEEZE = 1.5


def squeeze_advice(frames_hw: list[tuple[int, int]], input_hw: tuple[int, int]) -> str | None:
    """Advice where resizing the frames to the model input changes their median aspect by more than
    ``_SQUEEZE``, else None (frames of many shapes, such as MTD's crops, have no one aspect to keep)."""
    aspect = float(np.median([h / w for h, w in frames_hw]))
    factor = aspect / (input_hw[0] / input_hw[1])
    if max(factor, 1 / factor) < _SQUEEZE:
        return None
    short = min(input_hw)
    long = max(32, round(short * max(aspect, 1 / aspect) / 32) * 32)
    keep = [long, short] if aspect >= 1 else [short, long]
    return (f"frames of median aspect {aspect:.2f} (height / width) are squeezed {max(factor, 1 / factor):.1f}:1 into "
            f"the {input_hw[0]}x{input_hw[1]} model input, which blurs thin defects along one axis; "
            f"model.input_size {keep} keeps their aspect (or model.tiling.enabled: true)")


def split_train(paths: list[Path], holdout: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A deterministic split of train/good into fit and held-out validation images."""
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    n_val = max(2, int(round(len(shuffled) * holdout)))
    if len(shuffled) - n_val < 2:
        raise ValueError(f"too few good images to calibrate: {len(paths)} (need at least 4)")
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def calibrate(data: Path, out: Path, cfg: ModelConfig, progress: bool = True) -> Bundle:
    """Fit on DATA/train/good and write the bundle to ``out``. The bundle is written beside ``out``
    and swapped in once complete: a calibration that fails leaves the previous bundle as it was."""
    _check_settings(cfg)
    _check_replaceable(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed run that had this process id
    try:
        manifest = _write_bundle(data, partial, cfg, progress)
        _swap_in(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    d = manifest.decision
    log.info("image threshold %.4f (%s), pixel threshold %.4f, model %s written to %s", d.image_threshold,
             d.policy, d.pixel_threshold, manifest.model_id, out)
    return Bundle(out, manifest)


def _check_settings(cfg: ModelConfig) -> None:
    """Settings that only fail late (after minutes of fitting) are refused first."""
    if cfg.per_position and cfg.method.kind != "padim":
        raise ValueError(f"model.tiling.stats: per_position is supported by method padim, not "
                         f"{cfg.method.kind!r}; use shared")
    if cfg.mask.kind == "features":
        from engines.masks import check_detector

        check_detector(cfg.mask.detector)
    if cfg.taps == "auto":
        from calibration.taps import check_searchable

        check_searchable(cfg)


def _check_replaceable(out: Path) -> None:
    """``out`` is new, empty or a bundle: calibrate replaces a bundle, never anything else."""
    if out.is_symlink():
        raise ValueError(f"{out}: is a symbolic link; give calibrate --out the bundle directory itself")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; refusing to replace it with a bundle")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: not a model bundle (no {MANIFEST}) and not empty; refusing to delete it")


def _write_bundle(data: Path, path: Path, cfg: ModelConfig, progress: bool) -> Manifest:
    paths = [s.path for s in train_samples(data)]
    fit_paths, val_paths = split_train(paths, cfg.holdout, cfg.seed)
    val_images = [read_image(p) for p in val_paths]
    advice = None if cfg.tiling.enabled else squeeze_advice([i.shape[:2] for i in val_images], cfg.input_hw)
    if advice:
        log.warning(advice)
    tap_search = None
    if cfg.taps == "auto":
        from calibration.taps import search_taps

        tap_search = search_taps(cfg, fit_paths, val_images, cfg.tap_search, cfg.seed, cfg.weights, cfg.batch_size,
                                 progress)
    spec = cfg.spec(tap_search.chosen if tap_search else None)
    train = TrainImages(fit_paths, spec.input_hw, spec.tiling, cfg.batch_size, progress)
    held_out = TrainImages(val_paths, spec.input_hw, spec.tiling, cfg.batch_size, progress)
    log.info("calibrating %s on %d good images (%d held out for the thresholds)", spec.method.kind,
             len(fit_paths), len(val_paths))

    val_images = [read_image(p) for p in val_paths]
    validation = (validation_set(val_images, cfg.validation_defects, spec, cfg.seed)
                  if isinstance(spec.method, TrainedSettings) and cfg.validation_defects else None)
    context = FitContext(train, held_out, cfg.seed, cfg.weights, cfg.batch_size, progress, validation)
    fitted = implementation(spec.method.kind).fit(spec, context)
    write_tensors(path, fitted.network_state, fitted.head_tensors)
    frame_hw = read_image(fit_paths[0]).shape[:2]
    score_graph = build_score_graph(spec, fitted.network_state, fitted.head_tensors)
    tiles = len(make_grid(frame_hw, spec.input_hw, spec.tiling)) if spec.per_position else 2
    export_score_onnx(score_graph, fitted.head_tensors, path / ONNX, example_batch=tiles)
    manifest = Manifest(model=spec, frame_size=list(frame_hw), decision=_UNDECIDED, score_stats={"fit": fitted.info})
    if tap_search is not None:
        manifest.score_stats["tap_search"] = tap_search.to_dict()
    if spec.mask.kind != "none":
        from calibration.masks import fit_mask

        fitted_mask = fit_mask(spec.mask, fit_paths, path)
        manifest.mask_files, manifest.mask_learnt = fitted_mask.references, fitted_mask.learnt

    # Scored before the thresholds exist: the manifest is written (and sealed) once, at the end.
    pipeline = reference_pipeline(Bundle(path, manifest), cfg.batch_size)
    good = score_images(pipeline, val_images, progress, "thresholds")
    defect_scores = None
    if cfg.synthetic_defects:
        from calibration.defects import synthesize_defects

        synthetic = synthesize_defects(val_images, cfg.synthetic_defects, np.random.default_rng(cfg.seed))
        defects = score_images(pipeline, [img for img, _ in synthetic], progress, "synthetic")
        defect_scores = np.array([fs.score for fs in defects])
        manifest.score_stats["synthetic_defects"] = _stats(defect_scores)
    good_scores = np.array([fs.score for fs in good])
    chosen = choose_threshold(cfg.threshold, good_scores, defect_scores)
    manifest.decision = Decision(
        image_threshold=chosen.threshold, center=float(np.median(good_scores)), policy=chosen.policy,
        false_reject_rate=chosen.false_reject_rate, miss_rate=chosen.miss_rate,
        pixel_threshold=pixel_threshold([fs.map for fs in good], cfg.threshold.pixel_quantile),
        pixel_quantile=cfg.threshold.pixel_quantile)
    manifest.score_stats["holdout_good"] = _stats(good_scores)
    write_manifest(path, manifest)
    return load_bundle(path).manifest  # complete only if it loads as the agent will load it


def validation_set(good: list[np.ndarray], n: int, spec: ModelSpec, seed: int) -> ValidationSet:
    """Held-out good images and ``n`` synthetic defects made from them (calibration/defects.py), as
    model inputs: what trained methods stop on, so that no real defect chooses the epoch. A seed of
    its own keeps these defects apart from the threshold's ``synthetic_defects``."""
    images, masks = [], []
    for img, mask in validation_pairs(good, n, seed):
        images += model_inputs(img, spec.input_hw, spec.tiling)
        masks += [m > 127 for m in model_inputs(mask.astype(np.uint8) * 255, spec.input_hw, spec.tiling)]
    return ValidationSet(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)))


def validation_pairs(good: list[np.ndarray], n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frame, bool defect mask): the held-out good images (empty masks), then ``n`` synthetic
    defects made from them, kinds in turn (calibration/defects.py ``KINDS``)."""
    from calibration.defects import synthesize_defects

    pairs = [(img, np.zeros(img.shape[:2], bool)) for img in good]
    return pairs + synthesize_defects(good, n, np.random.default_rng([seed, 1]))


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; a bundle already at ``out`` is set aside first and deleted last."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def reference_pipeline(bundle: Bundle, batch_size: int = 8) -> Pipeline:
    """The pipeline on the torch reference runtime (CUDA where present), as calibration scores."""
    from engines.runtimes import RuntimeSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Pipeline(bundle, TorchBackend(bundle, TorchSettings(), device), RuntimeSettings(batch_size=batch_size))


def score_images(pipeline: Pipeline, images: list[np.ndarray], progress: bool, desc: str) -> list:
    """FrameScores of ``images`` through ``pipeline``, with progress."""
    return [pipeline.score_frame(img) for img in tqdm(images, desc=desc, unit="img", disable=not progress,
                                                       leave=False)]


def _stats(scores: np.ndarray) -> dict[str, float]:
    return {"n": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())}
