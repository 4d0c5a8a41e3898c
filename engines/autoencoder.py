"""Convolutional autoencoders (on pixels or on backbone features) and their residual heads.

The engine reconstructs; the head compares the reconstruction with what was reconstructed:
``ae-l2`` as the squared error, ``ae-ssim`` as 1 - SSIM with a local Gaussian window (SSIM
finds structural defects, such as a fine crack in a texture, that a blurry L2 residual misses).

Engine outputs: on pixels ``[reconstruction]`` (the head compares with the normalised input);
on features ``[features, reconstruction]``. The encoder and decoder are shared with the GANs
(engines/gan.py), where the decoder is the generator.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engines.backbones import FeatureNet
from engines.heads import register_head
from engines.network import feature_network, register_network

# Channels per stride-2 level of the pixel encoder (the decoder mirrors them): light enough to
# train on a 2-core CPU in minutes at 128 px, deep enough (stride 32) that the dense latent
# cannot copy a defect through.
PIXEL_CHANNELS = (16, 32, 64, 64, 128)


class Encoder(nn.Module):
    """(B, C, H, W) -> latent (B, L): stride-2 convolutions, then one dense layer."""

    def __init__(self, in_ch: int, hw: tuple[int, int], channels: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for out in channels:
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = out
        self.convs = nn.Sequential(*layers)
        s = 2 ** len(channels)
        self.fc = nn.Linear(c * (hw[0] // s) * (hw[1] // s), latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).flatten(1))


class Decoder(nn.Module):
    """latent (B, L) -> (B, C, H, W): one dense layer, then stride-2 transposed convolutions.

    Also the GANs' generator (a latent drawn from N(0, I) gives a sample)."""

    def __init__(self, out_ch: int, hw: tuple[int, int], channels: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        s = 2 ** len(channels)
        self.start = (channels[-1], hw[0] // s, hw[1] // s)
        self.fc = nn.Linear(latent_dim, math.prod(self.start))
        layers: list[nn.Module] = []
        rev = list(reversed(channels))
        for c, out in zip(rev, rev[1:] + [rev[-1]]):
            layers += [nn.LeakyReLU(0.2), nn.ConvTranspose2d(c, out, 4, stride=2, padding=1)]
        layers += [nn.LeakyReLU(0.2), nn.Conv2d(rev[-1], out_ch, 3, padding=1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # -1 keeps the batch axis dynamic in the exported graph.
        return self.convs(self.fc(z).view(-1, *self.start))


def check_size(hw: tuple[int, int], levels: int) -> None:
    s = 2 ** levels
    if hw[0] % s or hw[1] % s:
        raise ValueError(f"model.input_size {list(hw)}: this network needs multiples of {s}")


class PixelAutoencoder(nn.Module):
    """Normalised image -> its reconstruction."""

    def __init__(self, hw: tuple[int, int], latent_dim: int, channels: tuple[int, ...] = PIXEL_CHANNELS) -> None:
        super().__init__()
        check_size(hw, len(channels))
        self.encoder = Encoder(3, hw, channels, latent_dim)
        self.decoder = Decoder(3, hw, channels, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class FeatureCoder(nn.Module):
    """Per-position channel bottleneck over a feature map (1x1 convolutions, as in DFR):
    it learns which channel combinations good surfaces produce, whatever their position."""

    def __init__(self, channels: int, latent_dim: int) -> None:
        super().__init__()
        mid = (channels + latent_dim) // 2
        self.net = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.LeakyReLU(0.2), nn.Conv2d(mid, latent_dim, 1),
                                 nn.LeakyReLU(0.2), nn.Conv2d(latent_dim, mid, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(mid, channels, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class FeatureAutoencoder(nn.Module):
    """Normalised image -> [backbone features, their reconstruction]."""

    def __init__(self, features: FeatureNet, latent_dim: int) -> None:
        super().__init__()
        self.features = features
        self.coder = FeatureCoder(features.channels, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.coder(f)


def build_autoencoder(spec: dict[str, Any]) -> nn.Module:
    if spec.get("on_features"):
        return FeatureAutoencoder(feature_network(spec, pretrained=False), int(spec["latent_dim"]))
    return PixelAutoencoder(tuple(spec["input_size"]), int(spec["latent_dim"]), tuple(spec["channels"]))


# --- residuals ---------------------------------------------------------------------------------

def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor, data_range: float) -> torch.Tensor:
    """Local SSIM per channel (B, C, H, W), Gaussian-weighted statistics (Wang et al. 2004),
    computed with depthwise conv2d on the tensors' device; borders reflect-padded."""
    c = a.shape[1]
    k = window.to(a.dtype).expand(c, 1, *window.shape)
    r = window.shape[-1] // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (r, r, r, r), mode="reflect"), k, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def l2_residual(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pair -> (B, H, W) mean squared error over channels."""
    return (target - recon).pow(2).mean(1)


def ssim_residual(target: torch.Tensor, recon: torch.Tensor, window: torch.Tensor, data_range: float) -> torch.Tensor:
    """(B, C, H, W) pair -> (B, H, W) 1 - SSIM, averaged over channels."""
    return 1.0 - ssim_map(target, recon, window, data_range).mean(1)


class ResidualHead(nn.Module):
    """Engine outputs -> residual map at the engine's resolution (pixels or feature grid)."""

    def __init__(self, params: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.loss = params["loss"]
        if self.loss not in ("l2", "ssim"):
            raise ValueError(f"autoencoder head: unknown loss {self.loss!r} (expected 'l2' or 'ssim')")
        self.on_features = bool(params.get("on_features", False))
        self.data_range = float(params.get("data_range", 1.0))
        self.register_buffer("window", gaussian_window(int(params.get("window", 11)), float(params.get("sigma", 1.5))))

    def forward(self, outputs: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        target, recon = (outputs[0], outputs[1]) if self.on_features else (inputs, outputs[0])
        if self.loss == "l2":
            return l2_residual(target, recon)
        return ssim_residual(target, recon, self.window, self.data_range)


register_network("autoencoder", build_autoencoder)
register_head("ae-l2", ResidualHead)
register_head("ae-ssim", ResidualHead)
