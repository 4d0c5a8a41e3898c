"""Calibrating a product: fit on good images, export the engine, set the threshold, write the bundle."""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.settings import ModelConfig
from calibration.data import read_image, train_samples
from calibration.fit import get_fitter
from calibration.images import TrainImages
from calibration.thresholds import choose_threshold
from engines.decision import Normalizer
from engines.backbones import NORMALISATION
from engines.bundle import MANIFEST, Bundle, Manifest, load_bundle, write_manifest, write_tensors
from engines.export import export_onnx
from engines.network import build_network
from engines.runtimes.torch_backend import TorchBackend, TorchBackendConfig
from engines.scorer import Scorer

log = logging.getLogger(__name__)


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
    log.info("threshold %.4f (%s), model %s written to %s", manifest.threshold["threshold"],
             manifest.threshold["policy"], manifest.model_id, out)
    return Bundle(out, manifest)


def _check_settings(cfg: ModelConfig) -> None:
    """Settings that only fail late (after minutes of fitting) are refused first."""
    if cfg.tiling.enabled and cfg.tiling.stats == "per_position" and cfg.method != "padim":
        raise ValueError(f"model.tiling.stats: per_position is supported by method padim, not {cfg.method!r}; "
                         "use shared")
    if cfg.mask.kind == "features":
        from engines.masks import check_detector

        check_detector(cfg.mask.detector)


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
    mean, std = NORMALISATION[cfg.backbone]
    hw = (cfg.input_size[0], cfg.input_size[1])
    train = TrainImages(fit_paths, hw, cfg.tiling, cfg.batch_size, mean, std, progress)
    val = TrainImages(val_paths, hw, cfg.tiling, cfg.batch_size, mean, std, progress)
    log.info("calibrating %s on %d good images (%d held out for the threshold)", cfg.method, len(fit_paths), len(val_paths))

    result = get_fitter(cfg.method)(cfg, train, val)
    write_tensors(path, result.network_state, result.head_tensors)
    export_onnx(build_network(result.network, result.network_state), path / "model.onnx", hw)
    frame_hw = read_image(fit_paths[0]).shape[:2]
    manifest = Manifest(method=cfg.method, network=result.network,
                        input={"size": list(hw), "mean": list(mean), "std": list(std), "frame_size": list(frame_hw)},
                        head=result.head, postprocess={"blur_sigma": cfg.blur_sigma},
                        tiling=cfg.tiling.model_dump(), score_stats={"fit": result.info})
    if cfg.mask.kind != "none":
        from calibration.masks import fit_mask

        manifest.mask = fit_mask(cfg.mask, fit_paths, path)
    # Scored before the threshold exists: the manifest is written (and sealed) once, at the end.
    unsealed = Bundle(path, manifest)

    val_images = [read_image(p) for p in val_paths]
    good = score_images(unsealed, val_images, cfg.batch_size, progress, "threshold")
    defect_scores = None
    if cfg.synthetic_defects:
        from calibration.defects import synthesize_defects

        synthetic = synthesize_defects(val_images, cfg.synthetic_defects, np.random.default_rng(cfg.seed))
        defect_scores = score_images(unsealed, [img for img, _ in synthetic], cfg.batch_size, progress, "synthetic")
        manifest.score_stats["synthetic_defects"] = _stats(defect_scores)
    chosen = choose_threshold(cfg.threshold, good, defect_scores)
    manifest.threshold = chosen.to_dict()
    manifest.normalizer = Normalizer.fit(chosen.threshold, good).to_dict()
    manifest.score_stats["holdout_good"] = _stats(good)
    write_manifest(path, manifest)
    return load_bundle(path).manifest  # complete only if it loads as the agent will load it


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


def score_images(bundle: Bundle, images: list[np.ndarray], batch_size: int, progress: bool, desc: str) -> np.ndarray:
    """Image scores with the torch reference runtime (CUDA where present)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = Scorer(bundle, TorchBackend(bundle, TorchBackendConfig(device=device)), batch_size)
    return np.array([scorer.score_frame(img).score
                     for img in tqdm(images, desc=desc, unit="img", disable=not progress, leave=False)])


def _stats(scores: np.ndarray) -> dict[str, float]:
    return {"n": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())}
