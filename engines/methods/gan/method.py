"""The reconstruction GAN's network, head and fit.

Engine outputs: ``[image, reconstruction, D features of the image, D features of the
reconstruction]``. The head adds the pixel residual and the discriminator-feature distance, each
divided by its mean on held-out good images (head.safetensors) so that neither term dominates.
Training (GANomaly-style): pixel reconstruction, matching the discriminator's features of the
input, and fooling the discriminator, which learns to tell inputs from reconstructions.
Validation: the reconstruction error on held-out good images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.graph import pretrained_graph
from engines.methods import FitContext, Fitted
from engines.methods.autoencoder.method import PIXEL_CHANNELS, Decoder, Encoder, check_size
from engines.methods.gan import GanSettings
from engines.model import ModelSpec
from engines.training import batched, fit_loop, load_all, seed_everything, train_device

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        recon = self.generator(self.encoder(x))
        # One discriminator pass over input and reconstruction together.
        _, f = self.discriminator(torch.cat([x, recon]))
        f_x, f_r = f.chunk(2)
        return x, recon, f_x, f_r


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    return ReconstructionGan(spec.input_hw, spec.method.latent_dim, PIXEL_CHANNELS, DISC_CHANNELS)


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    return GanHead(tensors["residual_weight"], tensors["feature_weight"])


def gan_terms(recon: torch.Tensor, f_x: torch.Tensor, f_r: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel residual (B, H, W), discriminator-feature distance (B, H, W), upsampled)."""
    residual = (x - recon).pow(2).mean(1)
    feat = (f_x - f_r).pow(2).mean(1, keepdim=True)
    feat = F.interpolate(feat, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return residual, feat


class GanHead(nn.Module):
    def __init__(self, residual_weight: torch.Tensor, feature_weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("residual_weight", residual_weight.float())
        self.register_buffer("feature_weight", feature_weight.float())

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        x, recon, f_x, f_r = outputs
        residual, feat = gan_terms(recon, f_x, f_r, x)
        return self.residual_weight * residual + self.feature_weight * feat


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))  # the usual GAN momentum


def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    t: GanSettings = spec.method
    device = train_device()
    gen = seed_everything(context.seed)
    graph = pretrained_graph(spec, network, context.weights, device)
    net: ReconstructionGan = graph.network
    data = load_all(context.train, "images", graph.normalise, device)
    held = load_all(context.held_out, "images (held out)", graph.normalise, device)
    enc_gen = list(net.encoder.parameters()) + list(net.generator.parameters())
    opt_g, opt_d = adam(enc_gen, t.lr), adam(net.discriminator.parameters(), t.lr)

    def step(x: torch.Tensor) -> dict[str, float]:
        recon = net.generator(net.encoder(x))
        logit, _ = net.discriminator(torch.cat([x, recon.detach()]))
        l_x, l_r = logit.chunk(2)
        d_loss = bce(l_x, 1.0) + bce(l_r, 0.0)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        logit, feats = net.discriminator(torch.cat([x, recon]))
        f_x, f_r = feats.chunk(2)
        rec = (x - recon).pow(2).mean()
        g_loss = (t.reconstruction_weight * rec + t.feature_weight * (f_x.detach() - f_r).pow(2).mean()
                  + t.adversarial_weight * bce(logit.chunk(2)[1], 1.0))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"d": d_loss.item(), "g": g_loss.item(), "rec": rec.item()}

    def criterion() -> float:
        return sum(float((x - net.generator(net.encoder(x))).pow(2).mean()) * len(x)
                   for x in batched(held, t.batch_size, device)) / len(held)

    log = fit_loop({"gan": net}, data, step, criterion, t.epochs, t.patience, t.batch_size, gen, device,
                   "gan training", context.progress, t.max_minutes * 60)
    # Each term divided by its mean on held-out good images: both count alike in the map.
    with torch.no_grad():
        sums = torch.zeros(2)
        for x in batched(held, t.batch_size, device):
            x_, recon, f_x, f_r = net(x)
            residual, feat = gan_terms(recon, f_x, f_r, x_)
            sums += torch.stack([residual.mean(), feat.mean()]).cpu() * len(x)
        means = (sums / len(held)).clamp_min(1e-12)
    head_tensors = {"residual_weight": torch.tensor(0.5 / float(means[0])),
                    "feature_weight": torch.tensor(0.5 / float(means[1]))}
    state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=state, head_tensors=head_tensors, info={"samples": len(data), **log.to_dict()})
