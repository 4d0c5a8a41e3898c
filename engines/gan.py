"""GAN engines and heads: a fast reconstruction GAN (``gan``) and ALGAN (``algan``).

``gan`` (f-AnoGAN / GANomaly line): an encoder trained together with the generator maps an
image to its latent in one pass, so no per-image latent search is needed at inference; the
engine returns ``[reconstruction, D features of the input, D features of the reconstruction]``
and the head adds the pixel residual and the discriminator-feature distance, each divided by
its mean on held-out good images so that neither term dominates. Fixed input size: suits tiles.

``algan`` (Murase and Fukumizu 2022): the discriminator, trained to separate good images from
the generator's pseudo-anomalies, is the detector. It is fully convolutional, so the engine
returns a spatial logit map ``[(B, 1, h, w)]`` (stride 8 on pixels; the feature grid on
features), and the head turns it into -log D, high where the patch looks anomalous.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engines.autoencoder import PIXEL_CHANNELS, Decoder, Encoder, check_size
from engines.heads import register_head
from engines.network import feature_network, register_network

DISC_CHANNELS = (16, 32, 64)   # stride-2 levels of the pixel discriminator (stride 8 map)


class Discriminator(nn.Module):
    """Fully convolutional: (B, C, H, W) -> (logit map (B, 1, h, w), feature map (B, F, h, w)).

    ``strided`` levels halve the resolution (pixels); on a feature grid they keep it."""

    def __init__(self, in_ch: int, channels: tuple[int, ...], strided: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for out in channels:
            conv = nn.Conv2d(c, out, 4, stride=2, padding=1) if strided else nn.Conv2d(c, out, 3, padding=1)
            layers += [conv, nn.LeakyReLU(0.2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.logit = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.logit(f), f


class ReconstructionGan(nn.Module):
    """Encoder + generator + discriminator; the exported engine for ``gan``."""

    def __init__(self, hw: tuple[int, int], latent_dim: int, channels: tuple[int, ...] = PIXEL_CHANNELS,
                 disc_channels: tuple[int, ...] = DISC_CHANNELS) -> None:
        super().__init__()
        check_size(hw, len(channels))
        self.encoder = Encoder(3, hw, channels, latent_dim)
        self.generator = Decoder(3, hw, channels, latent_dim)
        self.discriminator = Discriminator(3, disc_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon = self.generator(self.encoder(x))
        # One discriminator pass over input and reconstruction together.
        _, f = self.discriminator(torch.cat([x, recon]))
        f_x, f_r = f.chunk(2)
        return recon, f_x, f_r


class AlganPixels(nn.Module):
    """The ALGAN detector on images: the discriminator's logit map."""

    def __init__(self, disc_channels: tuple[int, ...] = DISC_CHANNELS) -> None:
        super().__init__()
        self.discriminator = Discriminator(3, disc_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)[0]


class AlganFeatures(nn.Module):
    """The ALGAN detector on backbone features: frozen feature network, then the discriminator."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.features = feature_network(spec, pretrained=False)
        self.discriminator = Discriminator(self.features.channels, tuple(spec["disc_channels"]), strided=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.features(x))[0]


def build_gan(spec: dict[str, Any]) -> nn.Module:
    return ReconstructionGan(tuple(spec["input_size"]), int(spec["latent_dim"]), tuple(spec["channels"]),
                             tuple(spec["disc_channels"]))


def build_algan(spec: dict[str, Any]) -> nn.Module:
    if spec.get("on_features"):
        return AlganFeatures(spec)
    return AlganPixels(tuple(spec["disc_channels"]))


def gan_terms(recon: torch.Tensor, f_x: torch.Tensor, f_r: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel residual (B, H, W), discriminator-feature distance (B, H, W), upsampled)."""
    residual = (x - recon).pow(2).mean(1)
    feat = (f_x - f_r).pow(2).mean(1, keepdim=True)
    feat = F.interpolate(feat, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return residual, feat


class GanHead(nn.Module):
    def __init__(self, params: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.w_residual = float(params["residual_weight"])
        self.w_feature = float(params["feature_weight"])

    def forward(self, outputs: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        residual, feat = gan_terms(outputs[0], outputs[1], outputs[2], inputs)
        return self.w_residual * residual + self.w_feature * feat


class AlganHead(nn.Module):
    """Logit map -> -log D(patch is good) = softplus(-logit): 0 where surely good, growing with doubt."""

    def __init__(self, _params: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()

    def forward(self, outputs: list[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return F.softplus(-outputs[0][:, 0])


register_network("gan", build_gan)
register_network("algan", build_algan)
register_head("gan", GanHead)
register_head("algan", AlganHead)
