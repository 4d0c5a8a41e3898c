"""Fitting the autoencoders (``ae-l2``, ``ae-ssim``) on good images, on pixels or backbone features.

The training loss is the head's residual (L2, or 1 - SSIM), so the network learns to make
exactly the map that scores it small on good parts; the validation criterion is the same
loss on the held-out good images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from calibration.fit import FitResult, register_fitter
from calibration.padim import network_spec
from calibration.training import batched, fit_loop, load_all, seed_everything, train_device
from engines.autoencoder import (PIXEL_CHANNELS, FeatureAutoencoder, PixelAutoencoder, gaussian_window,
                                 l2_residual, ssim_residual)
from engines.network import feature_network

if TYPE_CHECKING:
    from calibration.settings import ModelConfig
    from calibration.images import TrainImages

# SSIM window: 11 px, sigma 1.5 on pixels (Wang et al.); a feature grid is 8x coarser, so 5 cells.
PIXEL_WINDOW, FEATURE_WINDOW = (11, 1.5), (5, 1.0)


def fit_autoencoder(cfg: "ModelConfig", train: "TrainImages", val: "TrainImages") -> FitResult:
    t = cfg.train
    loss = {"ae-l2": "l2", "ae-ssim": "ssim"}[cfg.method]
    device = train_device()
    gen = seed_everything(cfg.seed)
    hw = (cfg.input_size[0], cfg.input_size[1])
    if t.on_features:
        spec = {**network_spec(cfg), "kind": "autoencoder", "on_features": True, "latent_dim": t.latent_dim}
        features = feature_network(spec, pretrained=True).to(device).eval()
        data = load_all(train, "features", features, device)
        held = load_all(val, "features (val)", features, device)
        engine = FeatureAutoencoder(features, t.latent_dim)
        coder = engine.coder
        window, sigma = FEATURE_WINDOW
        # Features have no fixed range; the spread of the good ones stands in for it in SSIM's constants.
        data_range = feature_range(data)
    else:
        spec = {"kind": "autoencoder", "on_features": False, "input_size": list(hw),
                "channels": list(PIXEL_CHANNELS), "latent_dim": t.latent_dim}
        data = load_all(train, "images")
        held = load_all(val, "images (val)")
        engine = PixelAutoencoder(hw, t.latent_dim, PIXEL_CHANNELS)
        coder = engine
        window, sigma = PIXEL_WINDOW
        data_range = 255.0 / float(min(train.std))  # normalised 0..255
    spec.pop("weights", None)  # the bundle carries the weights itself
    coder.to(device)
    win = gaussian_window(window, sigma).to(device)

    def residual(x: torch.Tensor) -> torch.Tensor:
        r = coder(x)
        return l2_residual(x, r) if loss == "l2" else ssim_residual(x, r, win, data_range)

    opt = torch.optim.Adam(coder.parameters(), lr=t.lr)

    def step(x: torch.Tensor) -> dict[str, float]:
        value = residual(x).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return {"loss": value.item()}

    def criterion() -> float:
        total = sum(float(residual(x).mean()) * len(x) for x in batched(held, t.batch_size, device))
        return total / len(held)

    log = fit_loop({"coder": coder}, data, step, criterion, t.epochs, t.patience, t.batch_size, gen, device,
                   f"{cfg.method} training")
    head = {"loss": loss, "on_features": t.on_features, "data_range": data_range, "window": window, "sigma": sigma,
            "input_size": list(hw), "latent_dim": t.latent_dim, "epochs": t.epochs, "batch_size": t.batch_size,
            "lr": t.lr}
    state = {k: v.detach().cpu().contiguous() for k, v in engine.cpu().state_dict().items()}
    return FitResult(network=spec, network_state=state, head=head, head_tensors={},
                     info={"samples": len(data), **log.to_dict()})


def feature_range(data: torch.Tensor) -> float:
    """The 0.1 %..99.9 % spread of feature values (on a strided sample: quantile has a size limit)."""
    flat = data.flatten()
    flat = flat[:: max(1, flat.numel() // 2 ** 20)].float()
    return float(flat.quantile(0.999) - flat.quantile(0.001))


register_fitter("ae-l2", fit_autoencoder)
register_fitter("ae-ssim", fit_autoencoder)
