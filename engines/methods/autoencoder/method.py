"""The autoencoders' networks, residual head and fit.

Engine outputs are ``[target, reconstruction]``: on pixels the normalised image at the working
side and its reconstruction, on features the standardised backbone features and theirs; the
head compares the two, as each paper does: the squared error per position (``ae-l2``), or
1 - SSIM with Gaussian-weighted local statistics (``ae-ssim``; 11 px, sigma 1.5 on pixels as
Bergmann et al.; 5 cells on the 8x coarser feature grid). Training loss is the head's own
residual, so the network learns to make exactly the map that scores it small on good parts.
Training stops on synthetic defects among held-out good images (engines/validation.py), or on
the held-out residual when calibration gives none. The per-position feature coder is not trained:
its closed-form fit is judged on the same criterion, recorded in the fit info.

``Encoder``/``Decoder`` (a dense-latent pair) are the GANs' building blocks (``gan``; the
decoder is ALGAN's pixel generator); the pixel autoencoder is Bergmann et al.'s own network.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from engines.backbones import NORMALISATION, FeatureNet
from engines.graph import feature_network, pretrained_graph
from engines.methods import FitContext, Fitted
from engines.methods.autoencoder import AutoencoderSettings
from engines.model import ModelSpec
from engines.training import batched, fit_loop, load_all, seed_everything, standardise, train_device
from engines.validation import prepare_validation

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


# Bergmann et al. (2019), Table 1, at a 128 px working side: (out channels, kernel, stride) of the
# encoder's convolutions; the dense layer to the latent stands for their last 8x8 convolution
# (the same map at any working side). The decoder mirrors it.
BERGMANN_ENCODER = ((32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1))
BERGMANN_STRIDE = 16
FEATURE_AGGREGATE = 3  # 3x3 local average of the taps, as the other feature methods' neighbourhoods


def _conv(c_in: int, c_out: int, k: int, s: int, transposed: bool = False) -> nn.Module:
    if transposed and s > 1:
        return nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=1)
    return nn.Conv2d(c_in, c_out, k, stride=s, padding=1)


class PixelAutoencoder(nn.Module):
    """Normalised image -> [the image at the working size, its reconstruction]: Bergmann et al.'s
    convolutional autoencoder with a dense latent."""

    def __init__(self, input_hw: tuple[int, int], side: int, latent_dim: int) -> None:
        super().__init__()
        scale = min(1.0, side / max(input_hw))  # never larger than the input
        self.work_hw = tuple(max(BERGMANN_STRIDE, int(round(n * scale / BERGMANN_STRIDE)) * BERGMANN_STRIDE)
                             for n in input_hw)
        enc: list[nn.Module] = []
        c = 3
        for out, k, s in BERGMANN_ENCODER:
            enc += [_conv(c, out, k, s), nn.LeakyReLU(0.2)]
            c = out
        self.encoder = nn.Sequential(*enc)
        self.start = (c, self.work_hw[0] // BERGMANN_STRIDE, self.work_hw[1] // BERGMANN_STRIDE)
        self.to_latent = nn.Linear(math.prod(self.start), latent_dim)
        self.from_latent = nn.Linear(latent_dim, math.prod(self.start))
        dec: list[nn.Module] = []
        layers = list(BERGMANN_ENCODER)
        ins = [3] + [out for out, _, _ in layers[:-1]]
        for (out, k, s), c_in in zip(reversed(layers), reversed(ins)):
            dec += [nn.LeakyReLU(0.2), _conv(out, c_in, k, s, transposed=True)]
        self.decoder = nn.Sequential(*dec)

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """The model input at the working size (bilinear; at a factor of 2 that is the 2x2 mean)."""
        if tuple(x.shape[-2:]) == self.work_hw:
            return x
        return F.interpolate(x, size=self.work_hw, mode="bilinear", align_corners=False)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        z = self.to_latent(self.encoder(x).flatten(1))
        # -1 keeps the batch axis dynamic in the exported graph.
        return self.decoder(self.from_latent(z).view(-1, *self.start))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.shrink(x)
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


class PositionCoder(nn.Module):
    """A linear bottleneck of its own at each grid position: the features' projection on that
    position's ``latent_dim`` principal directions of good features (orthonormal, so the decoder is
    the encoder's transpose). Fitted in closed form (``principal_directions``), not trained."""

    def __init__(self, channels: int, latent_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("basis", torch.zeros(*grid, channels, latent_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bchw,hwck->bkhw", f, self.basis)
        return torch.einsum("bkhw,hwck->bchw", z, self.basis)


@torch.no_grad()
def principal_directions(data: torch.Tensor, latent_dim: int) -> torch.Tensor:
    """Features (N, C, h, w) -> (h, w, C, latent_dim): at each position the top eigenvectors of the
    features' second moment, the L2 optimum of a linear autoencoder without bias (Baldi and
    Hornik 1989); centred features (standardised per position) make it that position's PCA."""
    n, c, h, w = data.shape
    x = data.permute(2, 3, 0, 1).reshape(h * w, n, c)
    moment = x.transpose(1, 2) @ x / n
    _, vectors = torch.linalg.eigh(moment)  # ascending eigenvalues
    return vectors[..., -latent_dim:].flip(-1).reshape(h, w, c, latent_dim).contiguous()


class FeatureAutoencoder(nn.Module):
    """Normalised image -> [standardised backbone features, their reconstruction]."""

    def __init__(self, features: FeatureNet, coder: nn.Module, statistics_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.features = features
        # Mean and spread of good features, per channel or per position too (set by fit): every
        # channel counts alike in the residual, not the loudest ones.
        self.register_buffer("feature_mean", torch.zeros(statistics_shape))
        self.register_buffer("feature_std", torch.ones(statistics_shape))
        self.coder = coder

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image -> standardised features (the frozen part)."""
        return (self.features(x) - self.feature_mean) / self.feature_std

    def reconstruct(self, f: torch.Tensor) -> torch.Tensor:
        return self.coder(f)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.shrink(x)
        return f, self.coder(f)


def latent_size(settings: AutoencoderSettings, channels: int = 3) -> int:
    if settings.latent_dim is not None:
        return settings.latent_dim
    return max(1, channels // 4) if settings.on_features else 100


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    settings: AutoencoderSettings = spec.method
    if settings.on_features:
        features = feature_network(spec, pool=FEATURE_AGGREGATE, pretrained=pretrained, weights=weights)
        shape = features.statistics_shape(spec.input_hw, settings.standardise == "position")
        latent, channels = latent_size(settings, features.channels), features.channels
        if settings.coder == "shared":
            return FeatureAutoencoder(features, FeatureCoder(channels, latent), shape)
        if latent >= channels:  # the projection would give every feature back: no residual
            raise ValueError(f"model.method.latent_dim {latent}: coder per-position needs fewer than the "
                             f"{channels} feature channels of taps {list(spec.taps)}")
        return FeatureAutoencoder(features, PositionCoder(channels, latent, features.grid(spec.input_hw)), shape)
    return PixelAutoencoder(spec.input_hw, settings.pixel_side, latent_size(settings))


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
        # The frozen backbone runs once per image; training sees only its standardised features.
        data = load_all(context.train, "features", lambda x: engine.features(graph.normalise(x)), device)
        data, mean, std = standardise(data, t.standardise == "position")
        engine.feature_mean.copy_(mean.to(device))
        engine.feature_std.copy_(std.to(device))
        data_range = feature_range(data)
    else:
        data = load_all(context.train, "images", lambda x: engine.shrink(graph.normalise(x)), device)
        data_range = 255.0 / float(min(NORMALISATION[spec.backbone][1]))
    prepare = lambda x: engine.shrink(graph.normalise(x))  # noqa: E731
    held = load_all(context.held_out, "inputs (held out)", prepare, device)
    validation = (prepare_validation(context.validation, prepare, context.batch_size, device)
                  if context.validation is not None and len(context.validation) else None)
    head_module = ResidualHead(t, data_range).to(device)
    trained = engine.coder if t.on_features else engine
    augment = t.augment and not t.on_features

    def residual(x: torch.Tensor) -> torch.Tensor:
        return head_module([x, engine.reconstruct(x)])

    def criterion() -> float:
        if validation is not None:
            return validation.error(residual, context.batch_size, device)
        total = sum(float(residual(x).mean()) * len(x) for x in batched(held, t.batch_size, device))
        return total / len(held)

    if isinstance(trained, PositionCoder):  # closed form: no epochs; the criterion is recorded all the same
        start = time.perf_counter()
        trained.basis.copy_(principal_directions(data, trained.basis.shape[-1]).to(device))
        with torch.no_grad():
            value = criterion()
        log = {"closed_form": True, "epochs_run": 0, "best_val": value, "fit_s": time.perf_counter() - start}
        return _fitted(graph, data, data_range, validation is not None, log)

    opt = torch.optim.Adam(trained.parameters(), lr=t.lr, weight_decay=1e-5)

    def step(x: torch.Tensor) -> dict[str, float]:
        value = residual(mirror_and_turn(x, gen) if augment else x).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return {"loss": value.item()}

    log = fit_loop({"coder": trained}, data, step, criterion, t.epochs, t.patience, t.batch_size, gen, device,
                   f"{t.kind} training", context.progress, t.max_minutes * 60, t.weight_average)
    return _fitted(graph, data, data_range, validation is not None, log.to_dict())


def _fitted(graph: nn.Module, data: torch.Tensor, data_range: float, synthetic: bool, log: dict) -> Fitted:
    state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=state, head_tensors={"data_range": torch.tensor(data_range)},
                  info={"samples": len(data), "validation": "synthetic defects" if synthetic else "loss", **log})


def mirror_and_turn(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored (either axis) and, when square, turned by a random quarter: the MVTec
    AD paper's augmentation of its autoencoders' training images."""
    b = len(x)
    draws = torch.rand(b, 3, generator=gen).to(x.device)
    x = torch.where((draws[:, 0] < 0.5).view(b, 1, 1, 1), x.flip(-1), x)
    x = torch.where((draws[:, 1] < 0.5).view(b, 1, 1, 1), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where((draws[:, 2] < 0.5).view(b, 1, 1, 1), x.transpose(-1, -2), x)
    return x


def feature_range(data: torch.Tensor) -> float:
    """The 0.1 %..99.9 % spread of feature values (on a strided sample: quantile has a size limit)."""
    flat = data.flatten()
    flat = flat[:: max(1, flat.numel() // 2 ** 20)].float()
    return float(flat.quantile(0.999) - flat.quantile(0.001))
