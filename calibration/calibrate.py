"""Calibrating a product: fit on good images, export the engine, set the threshold, write the bundle."""
from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent.config import ModelConfig
from calibration.data import read_image, train_samples
from calibration.fit import get_fitter
from calibration.images import TrainImages
from calibration.thresholds import Normalizer, choose_threshold
from engines.backbones import NORMALISATION
from engines.bundle import Bundle, Manifest, write_manifest, write_tensors
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
    paths = [s.path for s in train_samples(data)]
    fit_paths, val_paths = split_train(paths, cfg.holdout, cfg.seed)
    mean, std = NORMALISATION[cfg.backbone]
    hw = (cfg.input_size[0], cfg.input_size[1])
    train = TrainImages(fit_paths, hw, cfg.tiling, cfg.batch_size, mean, std, progress)
    val = TrainImages(val_paths, hw, cfg.tiling, cfg.batch_size, mean, std, progress)
    log.info("calibrating %s on %d good images (%d held out for the threshold)", cfg.method, len(fit_paths), len(val_paths))

    result = get_fitter(cfg.method)(cfg, train, val)
    if out.exists():
        shutil.rmtree(out)
    write_tensors(out, result.network_state, result.head_tensors)
    export_onnx(build_network(result.network, result.network_state), out / "model.onnx", hw)
    manifest = Manifest(method=cfg.method, network=result.network,
                        input={"size": list(hw), "mean": list(mean), "std": list(std)},
                        head=result.head, postprocess={"blur_sigma": cfg.blur_sigma},
                        tiling=asdict(cfg.tiling), score_stats={"fit": result.info})
    bundle = write_manifest(out, manifest)

    good = score_paths(bundle, val_paths, cfg.batch_size, progress, "threshold")
    chosen = choose_threshold(cfg.threshold, good)
    manifest.threshold = asdict(chosen)
    manifest.normalizer = Normalizer(threshold=chosen.threshold, center=float(np.median(good))).to_dict()
    manifest.score_stats["holdout_good"] = _stats(good)
    bundle = write_manifest(out, manifest)
    log.info("threshold %.4f (%s), model %s written to %s", chosen.threshold, chosen.policy, manifest.model_id, out)
    return bundle


def score_paths(bundle: Bundle, paths: list[Path], batch_size: int, progress: bool, desc: str) -> np.ndarray:
    """Image scores with the torch reference runtime on the CPU."""
    scorer = Scorer(bundle, TorchBackend(bundle, TorchBackendConfig(device="cpu")), batch_size)
    return np.array([scorer.score_frame(read_image(p)).score
                     for p in tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)])


def _stats(scores: np.ndarray) -> dict[str, float]:
    return {"n": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max())}
