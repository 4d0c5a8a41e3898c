"""The stopping criterion of trained methods: synthetic defects on held-out good images
(calibration builds them, engines score them), and its metrics."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn import metrics as sk

from calibration.calibrate import calibrate, split_train, validation_set
from calibration.data import read_image, train_samples
from conftest import small_model_config
from engines.methods import ValidationSet
from engines.model import ModelSpec
from engines.tiling import TilingConfig
from engines.ranking import average_precision, roc_auc as auroc
from engines.validation import prepare_validation


def test_metrics_match_scikit_learn() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(400, generator=gen) < 0.3
    scores = torch.rand(400, generator=gen) + 0.3 * labels
    tied = torch.round(scores * 4)  # ties: average ranks
    assert auroc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores))
    assert auroc(tied, labels) == pytest.approx(sk.roc_auc_score(labels, tied))
    assert average_precision(scores, labels) == pytest.approx(sk.average_precision_score(labels, scores))


@pytest.mark.parametrize("tiled", [False, True], ids=["resized", "tiled"])
def test_validation_set_holds_good_images_and_marked_defects(sample_data: Path, tiled: bool) -> None:
    paths = [s.path for s in train_samples(sample_data)]
    _, held = split_train(paths, 0.2, 0)
    good = [read_image(p) for p in held]
    spec = ModelSpec(input_size=[64, 64], tiling=TilingConfig(enabled=tiled, overlap=0.25))
    vs = validation_set(good, 6, spec, seed=0)
    per_image = len(vs) // (len(good) + 6)
    assert len(vs) == per_image * (len(good) + 6) and (per_image > 1) == tiled
    assert vs.images.dtype == torch.uint8 and vs.images.shape[1:] == (64, 64, 3)
    assert vs.masks.shape == (len(vs), 64, 64) and vs.masks.dtype == torch.bool
    assert not vs.masks[: per_image * len(good)].any()           # the good images come first, unmarked
    assert vs.masks[per_image * len(good):].flatten(1).any(1).sum() >= 6 if not tiled else vs.masks.any()
    again = validation_set(good, 6, spec, seed=0)                 # deterministic from the seed
    assert torch.equal(again.images, vs.images) and torch.equal(again.masks, vs.masks)


def test_criterion_is_zero_for_a_perfect_map_and_high_for_a_blind_one() -> None:
    masks = torch.zeros(8, 64, 64, dtype=torch.bool)
    masks[4:, 10:20, 30:45] = True                                   # four good, four with a defect
    images = (masks[..., None] * 255).to(torch.uint8).expand(-1, -1, -1, 3)
    vs = ValidationSet(images, masks)
    prepared = prepare_validation(vs, lambda x: x[..., 0].float(), 3, torch.device("cpu"))
    cpu = torch.device("cpu")
    assert prepared.error(lambda x: x, 3, cpu) == pytest.approx(0.0, abs=1e-6)       # the map is the mask
    assert prepared.error(lambda x: torch.rand(x.shape), 3, cpu) > 0.4                # sees nothing


@pytest.mark.parametrize("method", ["ae-l2", "algan"])
def test_trained_methods_stop_on_synthetic_defects(sample_data: Path, tmp_path: Path, method: str) -> None:
    settings = {"kind": method, "epochs": 2, "batch_size": 8, "latent_dim": 16, "patience": 2,
                "on_features": True, **({"coder": "shared"} if method == "ae-l2" else {})}  # trained, not closed form
    cfg = small_model_config(settings, input_size=[64, 64], validation_defects=6)
    fit = calibrate(sample_data, tmp_path / "b", cfg, progress=False).manifest.score_stats["fit"]
    assert fit["validation"] == "synthetic defects"
    assert fit["history"] and all(0.0 <= h["val"] <= 1.0 for h in fit["history"])  # 1 - (AUROC + AP) / 2
    cfg.validation_defects = 0
    fit = calibrate(sample_data, tmp_path / "c", cfg, progress=False).manifest.score_stats["fit"]
    assert fit["validation"] == "loss"
