"""ALGAN's network, head and fit.

The generator learns to fool the discriminator with samples from latents z ~ N(0, I), while the
discriminator learns to call good images good and three kinds of samples anomalous: G(z),
G(spread * z) with a much larger spread (far from the good manifold) and samples of an early
generator snapshot (crude, blurry images). Each step the discriminator sees as many
pseudo-anomalies as good images, a third of each kind. Validation: the discriminator's loss on
held-out good images and on fixed pseudo-anomalies. The discriminator is fully convolutional:
the engine returns its logit map ``[(B, 1, h, w)]`` (stride 8 on pixels; the feature grid on
features), and the head turns it into -log D, high where the patch looks anomalous.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from engines.graph import feature_network, pretrained_graph
from engines.methods import FitContext, Fitted
from engines.methods.algan import AlganSettings
from engines.methods.autoencoder.method import PIXEL_CHANNELS, Decoder, check_size, feature_range
from engines.methods.gan.method import DISC_CHANNELS, Discriminator, adam, bce
from engines.model import ModelSpec
from engines.training import batched, fit_loop, load_all, seed_everything, train_device

FEATURE_GEN_CHANNELS = (128, 128)   # generator on a feature grid (stride 4 -> grid)
FEATURE_DISC_CHANNELS = (128, 64)


class AlganPixels(nn.Module):
    """The ALGAN detector on images: the discriminator's logit map."""

    def __init__(self, disc_channels: tuple[int, ...] = DISC_CHANNELS) -> None:
        super().__init__()
        self.discriminator = Discriminator(3, disc_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)[0]


class AlganFeatures(nn.Module):
    """The ALGAN detector on backbone features: frozen feature network, then the discriminator."""

    def __init__(self, spec: ModelSpec, pretrained: bool, weights: str | None) -> None:
        super().__init__()
        self.features = feature_network(spec, pool=1, pretrained=pretrained, weights=weights)
        self.discriminator = Discriminator(self.features.channels, FEATURE_DISC_CHANNELS, strided=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.features(x))[0]


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    if spec.method.on_features:
        return AlganFeatures(spec, pretrained, weights)
    return AlganPixels(DISC_CHANNELS)


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    return AlganHead()


class AlganHead(nn.Module):
    """Logit map -> -log D(patch is good) = softplus(-logit): 0 where surely good, growing with doubt."""

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        return F.softplus(-outputs[0][:, 0])


def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    t: AlganSettings = spec.method
    device = train_device()
    gen = seed_everything(context.seed)
    graph = pretrained_graph(spec, network, context.weights, device)
    engine = graph.network
    if t.on_features:
        prepare = lambda x: engine.features(graph.normalise(x))  # noqa: E731
        data = load_all(context.train, "features", prepare, device)
        held = load_all(context.held_out, "features (held out)", prepare, device)
        grid = tuple(data.shape[-2:])
        check_size(grid, len(FEATURE_GEN_CHANNELS))
        generator = Decoder(data.shape[1], grid, FEATURE_GEN_CHANNELS, t.latent_dim)
        extra = {"feature_range": feature_range(data)}
    else:
        data = load_all(context.train, "images", graph.normalise, device)
        held = load_all(context.held_out, "images (held out)", graph.normalise, device)
        check_size(spec.input_hw, len(PIXEL_CHANNELS))
        generator = Decoder(3, spec.input_hw, PIXEL_CHANNELS, t.latent_dim)
        extra = {}
    disc: Discriminator = engine.discriminator
    generator.to(device)
    opt_g, opt_d = adam(generator.parameters(), t.lr), adam(disc.parameters(), t.lr)
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
        z = torch.randn(len(x), t.latent_dim, device=device)
        with torch.no_grad():
            fakes = pseudo_anomalies(torch.randn(len(x), t.latent_dim, device=device))
        d_loss = bce(disc(x)[0], 1.0) + bce(disc(fakes)[0], 0.0)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        g_loss = bce(disc(generator(z))[0], 1.0)
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
                   t.batch_size, gen, device, "algan training", context.progress, t.max_minutes * 60)
    network_state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=network_state, head_tensors={},
                  info={"samples": len(data), "snapshot_step": snapshot_at, **extra, **log.to_dict()})
