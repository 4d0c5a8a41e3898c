"""The autoencoders' networks, residual head and fit.

Engine outputs are ``[target, reconstruction]``: on pixels the normalised image and its
reconstruction, on features the backbone features and theirs; the head compares the two. The
encoder and decoder are shared with the GANs (the decoder is their generator). Training loss
is the head's own residual, so the network learns to make exactly the map that scores it
small on good parts; validation is the same loss on the held-out good images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engines.backbones import NORMALISATION, FeatureNet
from engines.graph import feature_network, pretrained_graph
from engines.methods import FitContext, Fitted
from engines.methods.autoencoder import AutoencoderSettings
from engines.model import ModelSpec
from engines.training import batched, fit_loop, load_all, seed_everything, train_device

# SSIM window: 11 px, sigma 1.5 on pixels (Wang et al.); a feature grid is 8x coarser, so 5 cells.
PIXEL_WINDOW, FEATURE_WINDOW = (11, 1.5), (5, 1.0)


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
    """Normalised image -> [the image, its reconstruction]: the head compares the two."""

    def __init__(self, hw: tuple[int, int], latent_dim: int, channels: tuple[int, ...] = PIXEL_CHANNELS) -> None:
        super().__init__()
        check_size(hw, len(channels))
        self.encoder = Encoder(3, hw, channels, latent_dim)
        self.decoder = Decoder(3, hw, channels, latent_dim)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.reconstruct(x)


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

    def reconstruct(self, f: torch.Tensor) -> torch.Tensor:
        return self.coder(f)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.coder(f)


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    settings: AutoencoderSettings = spec.method
    if settings.on_features:
        features = feature_network(spec, pool=1, pretrained=pretrained, weights=weights)
        return FeatureAutoencoder(features, settings.latent_dim)
    return PixelAutoencoder(spec.input_hw, settings.latent_dim, PIXEL_CHANNELS)


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    return ResidualHead(spec.method, float(tensors["data_range"]))


# --- residuals ---------------------------------------------------------------------------------

def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor, data_range: float | torch.Tensor) -> torch.Tensor:
    """Local SSIM per channel (B, C, H, W), Gaussian-weighted statistics (Wang et al. 2004),
    computed with depthwise conv2d on the tensors' device; borders reflect-padded."""
    # The channel count is fixed per model; a plain int keeps the exported kernel's shape static.
    c = int(a.shape[1])
    k = window.to(a.dtype).expand(c, 1, *window.shape)
    r = int(window.shape[-1]) // 2

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


def ssim_residual(target: torch.Tensor, recon: torch.Tensor, window: torch.Tensor,
                  data_range: float | torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pair -> (B, H, W) 1 - SSIM, averaged over channels."""
    return 1.0 - ssim_map(target, recon, window, data_range).mean(1)


class ResidualHead(nn.Module):
    """[target, reconstruction] -> residual map at the engine's resolution (pixels or feature grid)."""

    def __init__(self, settings: AutoencoderSettings, data_range: float) -> None:
        super().__init__()
        self.ssim = settings.kind == "ae-ssim"
        self.register_buffer("data_range", torch.tensor(float(data_range)))
        window, sigma = FEATURE_WINDOW if settings.on_features else PIXEL_WINDOW
        self.register_buffer("window", gaussian_window(window, sigma))

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        target, recon = outputs[0], outputs[1]
        if self.ssim:
            return ssim_residual(target, recon, self.window, self.data_range)
        return l2_residual(target, recon)


def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    t: AutoencoderSettings = spec.method
    device = train_device()
    gen = seed_everything(context.seed)
    graph = pretrained_graph(spec, network, context.weights, device)
    engine = graph.network
    if t.on_features:
        # The frozen backbone runs once per image; training sees only its features.
        prepare = lambda x: engine.features(graph.normalise(x))  # noqa: E731
        data_range_of = feature_range
    else:
        prepare = graph.normalise
        data_range_of = lambda _: 255.0 / float(min(NORMALISATION[spec.backbone][1]))  # noqa: E731
    data = load_all(context.train, "inputs", prepare, device)
    held = load_all(context.held_out, "inputs (held out)", prepare, device)
    data_range = data_range_of(data)
    head_module = ResidualHead(t, data_range).to(device)
    trained = engine.coder if t.on_features else engine

    def residual(x: torch.Tensor) -> torch.Tensor:
        return head_module([x, engine.reconstruct(x)])

    opt = torch.optim.Adam(trained.parameters(), lr=t.lr)

    def step(x: torch.Tensor) -> dict[str, float]:
        value = residual(x).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return {"loss": value.item()}

    def criterion() -> float:
        total = sum(float(residual(x).mean()) * len(x) for x in batched(held, t.batch_size, device))
        return total / len(held)

    log = fit_loop({"coder": trained}, data, step, criterion, t.epochs, t.patience, t.batch_size, gen, device,
                   f"{t.kind} training", context.progress, t.max_minutes * 60)
    state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=state, head_tensors={"data_range": torch.tensor(data_range)},
                  info={"samples": len(data), **log.to_dict()})


def feature_range(data: torch.Tensor) -> float:
    """The 0.1 %..99.9 % spread of feature values (on a strided sample: quantile has a size limit)."""
    flat = data.flatten()
    flat = flat[:: max(1, flat.numel() // 2 ** 20)].float()
    return float(flat.quantile(0.999) - flat.quantile(0.001))
