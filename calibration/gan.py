"""Fitting the GANs on good images: the reconstruction GAN (``gan``) and ALGAN (``algan``).

``gan`` trains encoder and generator together, GANomaly-style: pixel reconstruction, matching
the discriminator's features of the input, and fooling the discriminator, which learns to tell
inputs from reconstructions. Validation: the reconstruction error on held-out good images.

``algan`` trains a generator to fool the discriminator with samples from latents z ~ N(0, I),
while the discriminator learns to call good images good and three kinds of samples anomalous:
G(z), G(spread * z) with a much larger spread (far from the good manifold) and samples of an
early generator snapshot (taken after a quarter of the first epoch: crude, blurry images).
Each step the discriminator sees as many pseudo-anomalies as good images, a third of each kind.
Validation: the discriminator's loss on held-out good images and on fixed pseudo-anomalies.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from calibration.autoencoder import feature_range
from calibration.fit import FitResult, register_fitter
from calibration.padim import network_spec
from calibration.training import batched, fit_loop, load_all, seed_everything, train_device
from engines.autoencoder import PIXEL_CHANNELS, Decoder, check_size
from engines.gan import DISC_CHANNELS, AlganFeatures, AlganPixels, Discriminator, ReconstructionGan, gan_terms
from engines.network import feature_network

if TYPE_CHECKING:
    from calibration.settings import ModelConfig
    from calibration.images import TrainImages


@dataclass(frozen=True)
class GanWeights:
    reconstruction: float = 50.0   # GANomaly's contextual weight: reconstruction dominates
    feature: float = 1.0           # discriminator-feature matching (f-AnoGAN's izi_f term)
    adversarial: float = 1.0


@dataclass(frozen=True)
class AlganSettings:
    anomaly_spread: float = 4.0     # std of the pseudo-anomalous latents (good ones: 1)
    snapshot_share: float = 0.25    # share of the first epoch after which the early generator is frozen
    feature_gen_channels: tuple[int, ...] = (128, 128)   # generator on a feature grid (stride 4 -> grid)
    feature_disc_channels: tuple[int, ...] = (128, 64)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))  # the usual GAN momentum


def fit_gan(cfg: "ModelConfig", train: "TrainImages", val: "TrainImages") -> FitResult:
    t, w = cfg.train, GanWeights()
    if t.on_features:
        raise ValueError("method 'gan' reconstructs pixels; train.on_features is for ae-l2, ae-ssim and algan")
    device = train_device()
    gen = seed_everything(cfg.seed)
    hw = (cfg.input_size[0], cfg.input_size[1])
    data, held = load_all(train, "images"), load_all(val, "images (val)")
    net = ReconstructionGan(hw, t.latent_dim, PIXEL_CHANNELS, DISC_CHANNELS).to(device)
    enc_gen = list(net.encoder.parameters()) + list(net.generator.parameters())
    opt_g, opt_d = _adam(enc_gen, t.lr), _adam(net.discriminator.parameters(), t.lr)

    def step(x: torch.Tensor) -> dict[str, float]:
        recon = net.generator(net.encoder(x))
        logit, _ = net.discriminator(torch.cat([x, recon.detach()]))
        l_x, l_r = logit.chunk(2)
        d_loss = _bce(l_x, 1.0) + _bce(l_r, 0.0)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        logit, feats = net.discriminator(torch.cat([x, recon]))
        f_x, f_r = feats.chunk(2)
        rec = (x - recon).pow(2).mean()
        g_loss = (w.reconstruction * rec + w.feature * (f_x.detach() - f_r).pow(2).mean()
                  + w.adversarial * _bce(logit.chunk(2)[1], 1.0))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"d": d_loss.item(), "g": g_loss.item(), "rec": rec.item()}

    def criterion() -> float:
        return sum(float((x - net.generator(net.encoder(x))).pow(2).mean()) * len(x)
                   for x in batched(held, t.batch_size, device)) / len(held)

    log = fit_loop({"gan": net}, data, step, criterion, t.epochs, t.patience, t.batch_size, gen, device,
                   "gan training")
    # Each term divided by its mean on held-out good images: both count alike in the map.
    with torch.no_grad():
        sums = torch.zeros(2)
        for x in batched(held, t.batch_size, device):
            residual, feat = gan_terms(*net(x), x)
            sums += torch.stack([residual.mean(), feat.mean()]).cpu() * len(x)
        means = (sums / len(held)).clamp_min(1e-12)
    spec = {"kind": "gan", "input_size": list(hw), "channels": list(PIXEL_CHANNELS),
            "disc_channels": list(DISC_CHANNELS), "latent_dim": t.latent_dim}
    head = {"residual_weight": 0.5 / float(means[0]), "feature_weight": 0.5 / float(means[1]),
            "loss_weights": asdict(w), "input_size": list(hw),
            "latent_dim": t.latent_dim, "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr}
    return FitResult(network=spec, network_state=_cpu_state(net), head=head, head_tensors={},
                     info={"samples": len(data), **log.to_dict()})


def fit_algan(cfg: "ModelConfig", train: "TrainImages", val: "TrainImages") -> FitResult:
    t, s = cfg.train, AlganSettings()
    device = train_device()
    gen = seed_everything(cfg.seed)
    hw = (cfg.input_size[0], cfg.input_size[1])
    if t.on_features:
        spec = {**network_spec(cfg), "kind": "algan", "on_features": True,
                "disc_channels": list(s.feature_disc_channels)}
        features = feature_network(spec, pretrained=True).to(device).eval()
        data, held = load_all(train, "features", features, device), load_all(val, "features (val)", features, device)
        engine = AlganFeatures(spec)
        engine.features.load_state_dict(features.state_dict())
        grid = tuple(data.shape[-2:])
        check_size(grid, len(s.feature_gen_channels))
        generator = Decoder(data.shape[1], grid, s.feature_gen_channels, t.latent_dim)
        extra = {"feature_range": feature_range(data)}
    else:
        spec = {"kind": "algan", "on_features": False, "disc_channels": list(DISC_CHANNELS)}
        data, held = load_all(train, "images"), load_all(val, "images (val)")
        engine = AlganPixels(DISC_CHANNELS)
        check_size(hw, len(PIXEL_CHANNELS))
        generator = Decoder(3, hw, PIXEL_CHANNELS, t.latent_dim)
        extra = {}
    spec.pop("weights", None)
    disc: Discriminator = engine.discriminator.to(device)
    generator.to(device)
    opt_g, opt_d = _adam(generator.parameters(), t.lr), _adam(disc.parameters(), t.lr)
    steps_per_epoch = -(-len(data) // t.batch_size)
    snapshot_at = max(1, int(steps_per_epoch * s.snapshot_share))
    state = {"step": 0, "early": None}
    z_val = torch.randn(len(held), t.latent_dim, generator=gen).to(device)

    def pseudo_anomalies(z: torch.Tensor) -> torch.Tensor:
        early = state["early"] or generator
        a, b = len(z) // 3, 2 * len(z) // 3
        parts = [(generator, z[:a]), (generator, s.anomaly_spread * z[a:b]), (early, z[b:])]
        return torch.cat([g(part) for g, part in parts if len(part)])

    def step(x: torch.Tensor) -> dict[str, float]:
        z = torch.randn(len(x), t.latent_dim, device=device)
        with torch.no_grad():
            fakes = pseudo_anomalies(torch.randn(len(x), t.latent_dim, device=device))
        d_loss = _bce(disc(x)[0], 1.0) + _bce(disc(fakes)[0], 0.0)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        g_loss = _bce(disc(generator(z))[0], 1.0)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        state["step"] += 1
        if state["early"] is None and state["step"] >= snapshot_at:
            state["early"] = copy.deepcopy(generator).eval().requires_grad_(False)
        return {"d": d_loss.item(), "g": g_loss.item()}

    def criterion() -> float:
        good = sum(float(F.softplus(-disc(x)[0]).mean()) * len(x) for x in batched(held, t.batch_size, device))
        bad = sum(float(F.softplus(disc(pseudo_anomalies(z))[0]).mean()) * len(z)
                  for z in z_val.split(t.batch_size))
        return (good + bad) / len(held)

    log = fit_loop({"discriminator": disc, "generator": generator}, data, step, criterion, t.epochs, t.patience,
                   t.batch_size, gen, device, "algan training")
    head = {"on_features": t.on_features, "anomaly_spread": s.anomaly_spread, "snapshot_step": snapshot_at,
            "map": "softplus(-logit) per discriminator patch (stride 8 on pixels, feature grid on features)",
            "input_size": list(hw), "latent_dim": t.latent_dim, "epochs": t.epochs, "batch_size": t.batch_size,
            "lr": t.lr, **extra}
    return FitResult(network=spec, network_state=_cpu_state(engine), head=head, head_tensors={},
                     info={"samples": len(data), **log.to_dict()})


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


register_fitter("gan", fit_gan)
register_fitter("algan", fit_algan)
