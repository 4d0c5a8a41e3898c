"""Autoencoders (ae-l2, ae-ssim) and GANs (gan, algan): residual maths, the shared training loop,
reproducibility, bundles, torch-vs-ONNX-Runtime parity (tiled and untiled) and evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pydantic import ValidationError

from calibration.calibrate import calibrate, split_train
from calibration.data import read_image, test_samples as list_test_samples, train_samples
from calibration.evaluate import evaluate
from calibration.images import TrainImages
from calibration.settings import ModelConfig
from conftest import assert_runtime_parity, pipeline, small_model_config
from engines.methods import FitContext, implementation
from engines.methods.autoencoder import TRAINING
from engines.methods.autoencoder.method import (PositionCoder, gaussian_window, l2_residual, principal_directions,
                                               ssim_map, ssim_residual)
from engines.tiling import TilingConfig
from engines.training import fit_loop

REPO = Path(__file__).resolve().parents[1]
# ONNX Runtime fuses and reorders float32 convolutions; residuals and SSIM are differences of
# nearly equal values, so they get a slightly looser bound than the feature heads' 1e-3.
PARITY_RTOL = 2e-3
SIZE = [64, 64]

# (name, method, on_features, tiled, other settings): every method, the feature variants (features
# standardised per position: the feature autoencoders' default; per channel: ALGAN's; the feature
# autoencoder's per-position and shared coders; ALGAN's map with and without its spread scale), and
# tiles for the GAN.
VARIANTS = [("ae-l2", "ae-l2", False, False, {}), ("ae-ssim", "ae-ssim", False, False, {}),
            ("ae-l2-features", "ae-l2", True, False, {}),
            ("ae-l2-features-shared", "ae-l2", True, False, {"coder": "shared"}), ("gan", "gan", False, False, {}),
            ("gan-tiled", "gan", False, True, {}), ("algan", "algan", False, False, {}),
            ("algan-features", "algan", True, False, {}),
            ("algan-features-scaled", "algan", True, False, {"spread_scale": True}),
            ("algan-features-by-position", "algan", True, False, {"standardise": "position", "spread_scale": False})]
BY_NAME = {v[0]: v for v in VARIANTS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(method: str, on_features: bool = False, tiled: bool = False, epochs: int = 2, seed: int = 0,
                **other: object):
    settings = {"kind": method, "epochs": epochs, "batch_size": 8, "latent_dim": 32, "patience": 2,
                "lr": 1e-3 if method.startswith("ae") else 2e-4, **other}
    if method != "gan":  # gan reconstructs pixels only; the others default to their own choice
        settings["on_features"] = on_features
    if method.startswith("ae") and on_features and settings.get("coder", "per-position") == "per-position":
        settings = {k: v for k, v in settings.items() if k not in TRAINING}  # closed form: nothing to train
    cfg = small_model_config(settings, input_size=list(SIZE), seed=seed)
    if tiled:
        cfg.tiling = TilingConfig(enabled=True, overlap=0.25)
    return cfg


@pytest.fixture(scope="module")
def bundles(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("aegan")
    return {name: calibrate(sample_data, root / name, tiny_config(method, feats, tiled, **other), progress=False)
            for name, method, feats, tiled, other in VARIANTS}


# --- residual maths ---------------------------------------------------------------------------

def test_ssim_matches_direct_formula_at_an_interior_pixel() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 2, 24, 24, generator=gen)
    b = (a + 0.2 * torch.rand(1, 2, 24, 24, generator=gen)).clamp(0, 1)
    win = gaussian_window(11, 1.5)
    got = ssim_map(a, b, win, data_range=1.0)
    y, x = 12, 9
    w = win.double()
    for c in range(2):
        pa, pb = a[0, c, y - 5:y + 6, x - 5:x + 6].double(), b[0, c, y - 5:y + 6, x - 5:x + 6].double()
        ma, mb = (w * pa).sum(), (w * pb).sum()
        va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
        cov = (w * (pa - ma) * (pb - mb)).sum()
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        ref = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
        assert got[0, c, y, x].item() == pytest.approx(ref.item(), abs=1e-5)


def test_ssim_sees_structure_that_l2_weighs_the_same() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.full((1, 1, 32, 32), 0.5)
    shifted = target + 0.1                                               # brightness change: same structure
    noise = torch.randn(1, 1, 32, 32, generator=gen)
    textured = target + 0.1 * noise / noise.pow(2).mean().sqrt()         # new structure, same energy
    win = gaussian_window()
    assert l2_residual(target, shifted).mean().item() == pytest.approx(l2_residual(target, textured).mean().item(),
                                                                       rel=1e-4)
    assert ssim_residual(target, textured, win, 1.0).mean() > 5 * ssim_residual(target, shifted, win, 1.0).mean()
    assert ssim_residual(target, target, win, 1.0).abs().max() < 1e-5


# --- the training loop ------------------------------------------------------------------------

def test_fit_loop_stops_after_patience_and_restores_the_best_epoch() -> None:
    net = nn.Linear(1, 1, bias=False)
    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 0.5])

    def step(_x: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            net.weight += 1.0
        return {"loss": 0.0}

    initial = net.weight.item()
    data = torch.zeros(4, 1)  # one batch per epoch: the weight counts the epochs
    log = fit_loop({"net": net}, data, step, lambda: next(vals), epochs=7, patience=2, batch_size=4,
                   gen=torch.Generator().manual_seed(0), device=torch.device("cpu"), desc="toy", progress=False)
    assert (log.epochs_run, log.best_epoch, log.best_val, log.stopped_early) == (4, 2, 2.0, True)
    assert net.weight.item() == pytest.approx(initial + 2.0)  # the weights after epoch 2, not epoch 4


def test_fit_loop_judges_and_keeps_the_averaged_weights_and_steps_on_from_the_raw_ones() -> None:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    seen_by_step, seen_by_criterion = [], []

    def step(_x: torch.Tensor) -> dict[str, float]:
        seen_by_step.append(net.weight.item())
        with torch.no_grad():
            net.weight += 1.0
        return {"loss": 0.0}

    def criterion() -> float:
        seen_by_criterion.append(net.weight.item())
        return -len(seen_by_criterion)  # every epoch better than the last: the last is kept

    data = torch.zeros(4, 1)  # two batches of 2 per epoch
    fit_loop({"net": net}, data, step, criterion, epochs=2, patience=2, batch_size=2,
             gen=torch.Generator().manual_seed(0), device=torch.device("cpu"), desc="toy", progress=False,
             average=0.5)
    # Raw weights 1, 2 | 3, 4; their average (decay 0.5 from 0): 0.5, 1.25 | 2.125, 3.0625.
    assert seen_by_step == [0.0, 1.0, 2.0, 3.0]
    assert seen_by_criterion == pytest.approx([1.25, 3.0625])
    assert net.weight.item() == pytest.approx(3.0625)


def test_fit_loop_stops_when_the_time_budget_is_spent() -> None:
    net = nn.Linear(1, 1, bias=False)
    vals = iter([3.0, 2.0, 1.0, 0.5])
    calls = []

    def step(_x: torch.Tensor) -> dict[str, float]:
        calls.append(1)
        return {"loss": 0.0}

    log = fit_loop({"net": net}, torch.zeros(4, 1), step, lambda: next(vals), epochs=4, patience=4, batch_size=4,
                   gen=torch.Generator().manual_seed(0), device=torch.device("cpu"), desc="toy", progress=False,
                   max_seconds=0.0)
    assert (log.epochs_run, len(calls), log.stopped_early) == (1, 1, True)


def test_training_is_reproducible_from_the_seed(sample_data: Path) -> None:
    paths = [s.path for s in train_samples(sample_data)]
    fit, held = split_train(paths, 0.2, 0)
    images = [TrainImages(p, tuple(SIZE), TilingConfig(), 8, progress=False) for p in (fit, held)]
    for method in ("ae-ssim", "algan"):
        spec = tiny_config(method, epochs=1).spec()
        runs = [implementation(method).fit(spec, FitContext(*images, seed=s, progress=False)) for s in (0, 0, 1)]
        same, other = runs[0].network_state, runs[2].network_state
        for k, v in same.items():
            torch.testing.assert_close(runs[1].network_state[k], v, rtol=0, atol=0)
        assert any(not torch.equal(other[k], v) for k, v in same.items()), f"{method}: seed has no effect"


# --- bundles, parity, evaluation --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_cpu_runtimes_match_torch_reference(bundles: dict, sample_data: Path, name: str, backend: str) -> None:
    bundle = bundles[name]
    images = [read_image(s.path) for s in list_test_samples(sample_data)]
    assert_runtime_parity(bundle, images, backend, PARITY_RTOL, threads=1)


@pytest.mark.parametrize("name", [v[0] for v in VARIANTS])
def test_bundle_records_method_settings_and_training(bundles: dict, name: str) -> None:
    m = bundles[name].manifest
    _, method, on_features, _, other = BY_NAME[name]
    assert m.method == method
    assert m.model.input_size == SIZE and m.model.method.latent_dim == 32
    assert getattr(m.model.method, "on_features", False) == on_features
    assert all(getattr(m.model.method, k) == v for k, v in other.items())
    fit = m.score_stats["fit"]
    if fit.get("closed_form"):  # the per-position feature coder: fitted at once, judged all the same
        assert name == "ae-l2-features" and fit["epochs_run"] == 0 and 0.0 <= fit["best_val"] <= 1.0
    else:
        assert m.model.method.epochs == 2
        assert 1 <= fit["epochs_run"] <= 2 and len(fit["history"]) == fit["epochs_run"]
    assert m.decision.image_threshold > m.decision.center
    for f in m.files:  # safetensors and ONNX only, no pickle
        assert not (bundles[name].path / f).read_bytes().startswith(b"\x80")


@pytest.mark.parametrize("name", ["ae-l2-features", "algan-features", "algan-features-by-position"])
def test_feature_standardisation_is_fitted_per_channel_or_per_position(bundles: dict, name: str) -> None:
    net = pipeline(bundles[name]).backend.net.engine.network
    by_position = bundles[name].manifest.model.method.standardise == "position"
    grid = (SIZE[0] // net.features.stride, SIZE[1] // net.features.stride)
    assert net.feature_mean.shape == (1, net.features.channels, *(grid if by_position else (1, 1)))
    if by_position:  # fitted: positions differ (the border's features are not the centre's)
        assert (net.feature_mean.flatten(2).std(-1) > 1e-3).any()


def test_principal_directions_give_each_position_its_own_subspace() -> None:
    gen = torch.Generator().manual_seed(0)
    c, k, h, w = 12, 3, 2, 3
    bases = torch.linalg.qr(torch.randn(h, w, c, k, generator=gen))[0]     # a k-dim subspace per position
    codes = torch.randn(200, h, w, k, generator=gen)
    data = torch.einsum("nhwk,hwck->nchw", codes, bases)
    coder = PositionCoder(c, k, (h, w))
    coder.basis.copy_(principal_directions(data, k))
    fitted = coder.basis.reshape(h * w, c, k)
    torch.testing.assert_close(fitted.transpose(1, 2) @ fitted, torch.eye(k).expand(h * w, k, k), atol=1e-5, rtol=0)
    torch.testing.assert_close(coder(data), data, atol=1e-4, rtol=0)       # good features come back
    # Position (0, 0)'s good feature placed at (1, 2) is a defect there: another place, another subspace.
    moved = data[:1].clone()
    moved[..., 1, 2] = data[:1, :, 0, 0]
    assert (moved - coder(moved))[..., 1, 2].pow(2).mean() > 0.1 * moved[..., 1, 2].pow(2).mean()


def test_per_position_coder_needs_a_bottleneck() -> None:
    spec = tiny_config("ae-l2", on_features=True, latent_dim=10_000).spec()
    with pytest.raises(ValueError, match="model.method.latent_dim 10000"):
        implementation("ae-l2").network(spec)


def test_per_position_coder_refuses_training_settings() -> None:
    with pytest.raises(ValidationError, match="epochs: the per-position coder is fitted in closed form"):
        ModelConfig(method={"kind": "ae-ssim", "on_features": True, "epochs": 5})
    assert ModelConfig(method={"kind": "ae-ssim", "on_features": True, "coder": "shared", "epochs": 5}).method.epochs == 5
    assert ModelConfig(method={"kind": "ae-ssim", "epochs": 5}).method.epochs == 5   # pixels: trained


def test_algan_divides_each_position_by_its_spread_on_good_parts(bundles: dict) -> None:
    scaled, plain = bundles["algan-features-scaled"], bundles["algan-features-by-position"]
    assert "inverse_spread" not in plain.head_tensors() and not plain.manifest.score_stats["fit"]["spread_scale"]
    inverse = scaled.head_tensors()["inverse_spread"]
    net = pipeline(scaled).backend.net
    stride = net.engine.network.features.stride
    assert inverse.shape == (SIZE[0] // stride, SIZE[1] // stride)
    assert (inverse > 0).all() and inverse.std() > 0   # fitted: positions differ
    x = torch.randint(0, 256, (2, *SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = net.engine(x)[0]
        torch.testing.assert_close(net.head([logits]), torch.nn.functional.softplus(-logits[:, 0]) * inverse)
    # auto (the default) keeps the scale only where it lowers the stopping criterion, on features and pixels.
    for name in ("algan-features", "algan"):
        fit = bundles[name].manifest.score_stats["fit"]
        assert fit["spread_scale"] == (fit["best_val_scaled"] < fit["best_val"])
        assert fit["spread_scale"] == ("inverse_spread" in bundles[name].head_tensors())


def test_algan_map_is_spatial(bundles: dict, sample_data: Path) -> None:
    backend = pipeline(bundles["algan"]).backend  # torch: its score graph's engine is the exported network
    x = torch.zeros(1, *SIZE, 3, dtype=torch.uint8)
    with torch.no_grad():
        assert backend.net.engine(x)[0].shape == (1, 1, SIZE[0] // 8, SIZE[1] // 8)
    assert backend.run(x)[0].shape == (1, *SIZE)


def test_evaluate_scores_every_method(bundles: dict, sample_data: Path) -> None:
    for name in ("ae-l2", "ae-ssim", "gan", "algan"):
        bundle = bundles[name]
        ev = evaluate(bundle, pipeline(bundle, "onnxruntime", threads=1), sample_data, progress=False)
        m = ev.metrics["overall"].to_dict()
        assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["pixel_aupr"] <= 1.0, name
        assert len(ev.scores) == len(list_test_samples(sample_data))


def test_gan_refuses_features() -> None:
    with pytest.raises(ValidationError, match="on_features"):  # gan reconstructs pixels: no such key
        ModelConfig(method={"kind": "gan", "on_features": True})


def test_calibrate_and_evaluate_commands(sample_data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  input_size: [64, 64]\n  method:\n    kind: ae-ssim\n    epochs: 1\n    batch_size: 8\n"
                   "    latent_dim: 16\n")
    out = tmp_path / "bundle"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "agent", "calibrate", "--data", str(sample_data), "--out", str(out),
                        "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_id"].startswith("ae-ssim-")
    r = subprocess.run([sys.executable, "-m", "agent", "evaluate", "--model", str(out), "--data", str(sample_data),
                        "--json", "--backend", "onnxruntime"], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["method"] == "ae-ssim" and metrics["ms_per_image"] > 0
    for key in ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0


def test_augmentation_mirrors_and_turns_each_image_on_its_own() -> None:
    from engines.methods.autoencoder.method import mirror_and_turn

    x = torch.arange(16 * 2 * 4 * 4, dtype=torch.float32).view(16, 2, 4, 4)
    out = mirror_and_turn(x, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(len(x)):
        candidates = {tuple(t.flatten().tolist()) for t in _dihedral(x[i])}
        assert tuple(out[i].flatten().tolist()) in candidates          # a mirror/turn of itself, nothing else
        seen.add(tuple((out[i] == x[i]).flatten().tolist()))
    assert len(seen) > 1                                                # not one transform for the whole batch


def _dihedral(img: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in (img, img.transpose(-1, -2)):
        out += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return out


def test_pixel_autoencoder_works_at_its_own_side() -> None:
    from engines.methods.autoencoder.method import network
    from engines.model import ModelSpec

    net = network(ModelSpec(method={"kind": "ae-ssim", "pixel_side": 64}, input_size=[128, 256]))
    target, recon = net(torch.zeros(2, 3, 128, 256))
    assert target.shape == recon.shape == (2, 3, 32, 64)                 # the longer side at pixel_side
    with pytest.raises(ValidationError, match="multiple of 16"):
        ModelConfig(method={"kind": "ae-l2", "pixel_side": 100})
