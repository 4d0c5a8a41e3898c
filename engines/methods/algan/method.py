"""ALGAN's network, head and fit.

**On features** (default), what is taken from where:

- ALGAN (Murase and Fukumizu 2022), feature variant: the data are ImageNet-backbone features; a
  generator maps latents z ~ N(0, I) to fake-normal features and latents with a much larger
  spread (``anomaly_spread`` * z) to pseudo-anomalous ones; the discriminator is trained to call
  real good features good and both kinds of generated ones anomalous, the generator to make its
  N(0, I) samples pass; the discriminator alone is the detector (fast at prediction).
- SimpleNet (Liu et al. 2023): locally aggregated features (3x3 average of the taps), a
  trainable linear feature adaptor, pseudo-anomalies made by adding Gaussian noise to the
  adapted good features, a two-layer per-position discriminator (linear, batch norm, leaky
  ReLU, linear), the truncated L1 loss ``max(0, m - D(good)) + max(0, m + D(fake))`` (m = 0.5),
  the adaptor learning at half the discriminator's rate, and the anomaly map ``-D`` per
  position, smoothed (the score graph's blur), its maximum the image score.
- Ours: features standardised per channel on the good images (the noise is then a share of
  each channel's spread whatever the backbone), the adaptor starting as the identity, the
  generator per position (1x1 convolutions) like the discriminator, and stopping on synthetic
  defects (engines/validation.py).

The engine returns the logit map ``[(B, 1, h, w)]`` (the feature grid on features, stride 8 on
pixels); the head is ``softplus(-logit)``, monotone in SimpleNet's ``-D`` and positive.

**On pixels**: the original image-space ALGAN (a dense-latent generator; pseudo-anomalies from
G(z), G(spread * z) and an early generator snapshot; binary cross-entropy).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engines.graph import feature_network, pretrained_graph
from engines.methods import FitContext, Fitted
from engines.methods.algan import AlganSettings
from engines.methods.autoencoder.method import PIXEL_CHANNELS, Decoder, check_size
from engines.model import ModelSpec
from engines.training import (batched, fit_loop, floored_spread, load_all, seed_everything, standardise,
                              train_device)
from engines.validation import PreparedValidation, prepare_validation

AGGREGATE = 3                        # SimpleNet's local neighbourhood (3x3) of each feature position
PIXEL_DISC_CHANNELS = (16, 32, 64)   # stride-2 levels of the pixel discriminator (stride 8 map)
GENERATOR_HIDDEN = 256


# --- networks ------------------------------------------------------------------------------------

class PositionDiscriminator(nn.Module):
    """SimpleNet's discriminator, applied at every position of a feature map: (B, C, h, w) -> (B, 1, h, w)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2),
                                 nn.Conv2d(hidden, 1, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class PositionGenerator(nn.Module):
    """ALGAN's generator per position: latents (B, L, h, w) -> adapted features (B, C, h, w)."""

    def __init__(self, latent_dim: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(latent_dim, GENERATOR_HIDDEN, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(GENERATOR_HIDDEN, GENERATOR_HIDDEN, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(GENERATOR_HIDDEN, channels, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class AlganFeatures(nn.Module):
    """The detector on features: frozen backbone (3x3 aggregated), standardisation, adaptor, discriminator."""

    def __init__(self, spec: ModelSpec, pretrained: bool, weights: str | None) -> None:
        super().__init__()
        self.features = feature_network(spec, pool=AGGREGATE, pretrained=pretrained, weights=weights)
        c = self.features.channels
        # Mean and spread of good features (per channel, or per position too): set by fit, saved
        # with the network weights.
        shape = self.features.statistics_shape(spec.input_hw, spec.method.standardise == "position")
        self.register_buffer("feature_mean", torch.zeros(shape))
        self.register_buffer("feature_std", torch.ones(shape))
        self.adaptor = nn.Conv2d(c, c, 1)
        with torch.no_grad():  # start as the identity: the noise scale means what it says from step one
            self.adaptor.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            self.adaptor.bias.zero_()
        self.discriminator = PositionDiscriminator(c, spec.method.hidden)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image -> standardised features (the frozen part)."""
        return (self.features(x) - self.feature_mean) / self.feature_std

    def judge(self, f: torch.Tensor) -> torch.Tensor:
        """Standardised features -> logit map (the trained part)."""
        return self.discriminator(self.adaptor(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge(self.embed(x))


class PixelDiscriminator(nn.Module):
    """Fully convolutional on images: (B, 3, H, W) -> logit map (B, 1, H/8, W/8)."""

    def __init__(self, channels: tuple[int, ...] = PIXEL_DISC_CHANNELS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for out in channels:
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.logit = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(self.features(x))


class AlganPixels(nn.Module):
    """The detector on images: the discriminator's logit map."""

    def __init__(self) -> None:
        super().__init__()
        self.discriminator = PixelDiscriminator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    if spec.method.on_features:
        return AlganFeatures(spec, pretrained, weights)
    return AlganPixels()


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    return AlganHead(tensors.get("inverse_spread"))


class AlganHead(nn.Module):
    """Logit map -> softplus(-logit): near 0 where surely good, growing with -D where anomalous;
    with ``inverse_spread`` (h, w) each position is divided by its spread on good parts
    (``spread_scale``; bundles written before it have none)."""

    def __init__(self, inverse_spread: torch.Tensor | None = None) -> None:
        super().__init__()
        self.inverse_spread: torch.Tensor | None
        self.register_buffer("inverse_spread", None if inverse_spread is None else inverse_spread.float())

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        score = F.softplus(-outputs[0][:, 0])
        return score if self.inverse_spread is None else score * self.inverse_spread


def inverse_spread(score_maps: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """1 / (each position's deviation of ``score_maps`` over ``data``), floored (engines/training.py)."""
    with torch.no_grad():
        maps = torch.cat([score_maps(f).cpu() for f in batched(data, batch_size, device)])
    return 1.0 / floored_spread(maps.std(0))


# --- fitting -------------------------------------------------------------------------------------

def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    if spec.method.on_features:
        return _fit_features(spec, context)
    return _fit_pixels(spec, context)


def _fit_features(spec: ModelSpec, context: FitContext) -> Fitted:
    t: AlganSettings = spec.method
    device = train_device()
    gen = seed_everything(context.seed)
    graph = pretrained_graph(spec, network, context.weights, device)
    net: AlganFeatures = graph.network
    raw = lambda x: net.features(graph.normalise(x))  # noqa: E731
    data, mean, std = standardise(load_all(context.train, "features", raw, device), t.standardise == "position")
    net.feature_mean.copy_(mean.to(device))
    net.feature_std.copy_(std.to(device))
    embed = lambda x: net.embed(graph.normalise(x))  # noqa: E731
    held = load_all(context.held_out, "features (held out)", embed, device)
    validation = (prepare_validation(context.validation, embed, context.batch_size, device)
                  if context.validation is not None and len(context.validation) else None)

    c = data.shape[1]
    generator = PositionGenerator(t.latent_dim, c).to(device)
    trained = {"adaptor": net.adaptor, "discriminator": net.discriminator}
    if t.generator:
        trained["generator"] = generator
    opt_d = torch.optim.Adam([{"params": net.discriminator.parameters(), "lr": t.lr},
                              {"params": net.adaptor.parameters(), "lr": t.lr / 2}], weight_decay=1e-5)
    opt_g = torch.optim.Adam(generator.parameters(), lr=t.lr, betas=(0.5, 0.999))
    m = t.margin

    def latents(n: int) -> torch.Tensor:
        return torch.randn(1, t.latent_dim, n, 1, device=device)

    def step(f: torch.Tensor) -> dict[str, float]:
        # Every model here is per position: a step trains on a random share of the batch's
        # positions, laid out as one (1, C, n, 1) column, so a CPU epoch stays short.
        cols = f.permute(1, 0, 2, 3).reshape(f.shape[1], -1)
        n = max(2, int(cols.shape[1] * t.position_share))
        cols = cols[:, torch.randperm(cols.shape[1], generator=gen)[:n].to(device)][None, :, :, None]
        adapted = net.adaptor(cols)
        fakes = [adapted + t.noise_std * torch.randn_like(adapted)]  # SimpleNet's Gaussian perturbation
        if t.generator:  # ALGAN: fake-normal and (wide latents) pseudo-anomalous features
            with torch.no_grad():
                fakes += [generator(latents(n // 2)), generator(t.anomaly_spread * latents(n // 2))]
        logits = net.discriminator(torch.cat([adapted, *fakes], dim=2))[0, 0, :, 0]
        real, fake = logits[:n], logits[n:]
        d_loss = F.relu(m - real).mean() + F.relu(m + fake).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        out = {"d": d_loss.item(), "p_true": float((real > 0).float().mean()),
               "p_fake": float((fake < 0).float().mean())}
        if t.generator:
            # The discriminator judges in eval mode here: its batch statistics must not see a
            # batch of fakes alone (they would tell it what a fake batch looks like).
            net.discriminator.eval()
            g_loss = F.relu(m - net.discriminator(generator(latents(n)))).mean()
            net.discriminator.train()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            out["g"] = g_loss.item()
        return out

    def criterion() -> float:
        if validation is not None:
            return validation.error(lambda f: F.softplus(-net.judge(f)[:, 0]), context.batch_size, device)
        # Without synthetic defects: SimpleNet's loss on held-out good features and their perturbations.
        total = 0.0
        for f in batched(held, t.batch_size, device):
            a = net.adaptor(f)
            noisy = a + t.noise_std * torch.randn(a.shape, generator=gen).to(device)
            total += float(F.relu(m - net.discriminator(a)).mean() + F.relu(m + net.discriminator(noisy)).mean()) * len(f)
        return total / len(held)

    log = fit_loop(trained, data, step, criterion, t.epochs, t.patience, t.batch_size, gen, device,
                   "algan training", context.progress, t.max_minutes * 60, t.weight_average)
    head_tensors, scale_info = _spread_scale(t, lambda f: F.softplus(-net.judge(f)[:, 0]), data, validation,
                                             log.best_val, context.batch_size, device)
    network_state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=network_state, head_tensors=head_tensors,
                  info={"samples": len(data), "validation": "synthetic defects" if validation else "loss",
                        **log.to_dict(), **scale_info})


def _spread_scale(t: AlganSettings, score: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
                  validation: PreparedValidation | None, best_val: float, batch_size: int,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """(head tensors, fit info): the head's ``inverse_spread`` where ``spread_scale`` asks for it
    (auto: where it lowers the criterion of the kept weights), from those weights, once: the
    per-frame head only multiplies."""
    if t.spread_scale is False or (t.spread_scale == "auto" and validation is None):
        return {}, {"spread_scale": False}
    inverse = inverse_spread(score, data, batch_size, device)
    info = {}
    if validation is not None:
        scaled = inverse.to(device)
        with torch.no_grad():
            info["best_val_scaled"] = validation.error(lambda x: score(x) * scaled, batch_size, device)
    kept = t.spread_scale is True or info["best_val_scaled"] < best_val
    return ({"inverse_spread": inverse} if kept else {}), {**info, "spread_scale": kept}


def _fit_pixels(spec: ModelSpec, context: FitContext) -> Fitted:
    t: AlganSettings = spec.method
    device = train_device()
    gen = seed_everything(context.seed)
    graph = pretrained_graph(spec, network, context.weights, device)
    disc: PixelDiscriminator = graph.network.discriminator
    data = load_all(context.train, "images", graph.normalise, device)
    held = load_all(context.held_out, "images (held out)", graph.normalise, device)
    validation = (prepare_validation(context.validation, graph.normalise, context.batch_size, device)
                  if context.validation is not None and len(context.validation) else None)
    check_size(spec.input_hw, len(PIXEL_CHANNELS))
    generator = Decoder(3, spec.input_hw, PIXEL_CHANNELS, t.latent_dim).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=t.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.lr, betas=(0.5, 0.999))
    steps_per_epoch = -(-len(data) // t.batch_size)
    snapshot_at = max(1, int(steps_per_epoch * t.snapshot_share))
    state = {"step": 0, "early": None}
    z_val = torch.randn(len(held), t.latent_dim, generator=gen).to(device)

    def pseudo_anomalies(z: torch.Tensor) -> torch.Tensor:
        early = state["early"] or generator
        a, b = len(z) // 3, 2 * len(z) // 3
        parts = [(generator, z[:a]), (generator, t.anomaly_spread * z[a:b]), (early, z[b:])]
        return torch.cat([g(part) for g, part in parts if len(part)])

    def step(x: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            fakes = pseudo_anomalies(torch.randn(len(x), t.latent_dim, device=device))
        d_loss = _bce(disc(x), 1.0) + _bce(disc(fakes), 0.0)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = _bce(disc(generator(torch.randn(len(x), t.latent_dim, device=device))), 1.0)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        state["step"] += 1
        if state["early"] is None and state["step"] >= snapshot_at:
            state["early"] = copy.deepcopy(generator).eval().requires_grad_(False)
        return {"d": d_loss.item(), "g": g_loss.item()}

    def criterion() -> float:
        if validation is not None:
            return validation.error(lambda x: F.softplus(-disc(x)[:, 0]), context.batch_size, device)
        good = sum(float(F.softplus(-disc(x)).mean()) * len(x) for x in batched(held, t.batch_size, device))
        bad = sum(float(F.softplus(disc(pseudo_anomalies(z))).mean()) * len(z) for z in z_val.split(t.batch_size))
        return (good + bad) / len(held)

    log = fit_loop({"discriminator": disc, "generator": generator}, data, step, criterion, t.epochs, t.patience,
                   t.batch_size, gen, device, "algan training", context.progress, t.max_minutes * 60,
                   t.weight_average)
    head_tensors, scale_info = _spread_scale(t, lambda x: F.softplus(-disc(x)[:, 0]), data, validation,
                                             log.best_val, context.batch_size, device)
    network_state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=network_state, head_tensors=head_tensors,
                  info={"samples": len(data), "snapshot_step": snapshot_at,
                        "validation": "synthetic defects" if validation else "loss", **log.to_dict(), **scale_info})


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
