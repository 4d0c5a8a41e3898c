"""The reconstruction GAN's network, head and fit (see the package docstring for the design).

Engine outputs: ``[image, reconstruction, features of the image, features of the reconstruction]``
(features: the frozen backbone's stage2 and stage3, stride 4). The head turns them into a
stride-4 map: 1 - SSIM of the grey images, pooled to stride 4, and the squared feature
distance, each standardised per position by its mean and deviation on held-out good inputs
(head.safetensors), averaged. The score graph upsamples and blurs it as for every method.

Validation criterion (no real defect), ``stop_on``: the repair error on held-out good inputs given
fixed synthetic defects (how far the reconstruction of a damaged good input is from the good
input), or how well the head's map finds calibration's synthetic defects among held-out good
inputs (engines/validation.py), as the other trained methods; the per-position statistics the
head standardises by are then taken, each epoch, from that set's good inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.backbones import FeatureNet, FeatureSpec, make_backbone
from engines.graph import EngineGraph, pretrained_graph
from engines.methods import FitContext, Fitted
from engines.methods.autoencoder.method import gaussian_window, ssim_map
from engines.methods.gan import GanSettings
from engines.methods.gan.corruption import corrupt
from engines.model import ModelSpec
from engines.training import batched, fit_loop, floored_spread, load_all, seed_everything, train_device
from engines.validation import prepare_validation

FEATURE_TAPS = ("stage2", "stage3")  # stride 4 and 8: edges and small textures, before semantics
LOSS_TAP = "stage2"                   # training's feature matching: the cheaper half (backward through Lite0)
MAP_STRIDE = 4                        # the head's map: the feature grid
LEVELS = 4                            # stride-2 levels of the generator; inputs are multiples of 16
HELD_OUT_INPUTS = 64                  # validation inputs: enough for a stable criterion, seconds per epoch
DATA_RANGE = 2.0                      # Lite0 normalisation maps 0..255 to about -1..1
STATS_INPUTS = 512                    # held-out inputs for the head's per-position statistics
STATISTICS = ("ssim_mean", "ssim_std", "feature_mean", "feature_std")


def conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    # Reflect padding: zero padding made every border a defect (a frame of high residual around
    # every good image, the image score's maximum).
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2 if stride == 1 else 1,
                                   padding_mode="reflect"), nn.LeakyReLU(0.2))


class Generator(nn.Module):
    """U-Net on a 2x2 space-to-depth of the image (no convolution at full resolution: half the
    cost), skips at strides 2, 4 and 8 keep the surface sharp, a ``latent``-channel stride-16
    bottleneck carries the context that decides what belongs. Fully convolutional."""

    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        ch = [width * 2 ** i for i in range(LEVELS - 1)]       # strides 2, 4, 8
        self.inc = nn.Sequential(nn.PixelUnshuffle(2), conv(12, ch[0]), conv(ch[0], ch[0]))
        self.downs = nn.ModuleList(nn.Sequential(conv(ch[i - 1], ch[i], 4, 2), conv(ch[i], ch[i]))
                                   for i in range(1, len(ch)))
        self.bottom = nn.Sequential(conv(ch[-1], latent, 4, 2), conv(latent, latent))
        self.ups, self.merges = nn.ModuleList(), nn.ModuleList()
        c = latent
        for out in reversed(ch):
            self.ups.append(nn.Sequential(nn.ConvTranspose2d(c, out, 2, stride=2), nn.LeakyReLU(0.2)))
            self.merges.append(conv(2 * out, out))
            c = out
        self.out = nn.Sequential(nn.Conv2d(ch[0], 12, 3, padding=1, padding_mode="reflect"), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = self.bottom(skips[-1])
        for up, merge, skip in zip(self.ups, self.merges, reversed(skips)):
            y = merge(torch.cat([up(y), skip], 1))
        return self.out(y)


DISC_CHANNELS = (16, 32, 64)   # stride-2 levels of the pixel discriminator (stride 8 map); ALGAN's too


class Discriminator(nn.Module):
    """Fully convolutional (PatchGAN): (B, C, H, W) -> (logit map (B, 1, h, w), feature map (B, F, h, w)).

    ``strided`` levels halve the resolution (pixels); on a feature grid they keep it. Shared with
    ALGAN (engines/methods/algan)."""

    def __init__(self, in_ch: int, channels: tuple[int, ...], strided: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for out in channels:
            layer = nn.Conv2d(c, out, 4, stride=2, padding=1) if strided else nn.Conv2d(c, out, 3, padding=1)
            layers += [layer, nn.LeakyReLU(0.2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.logit = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.logit(f), f


class ReconstructionGan(nn.Module):
    """Generator + frozen feature network + discriminator; the exported engine for ``gan`` (the
    discriminator is trained with it but not run at scoring)."""

    def __init__(self, features: FeatureNet, width: int, latent: int) -> None:
        super().__init__()
        self.generator = Generator(width, latent)
        self.features = features
        self.discriminator = Discriminator(3, (width, 2 * width, 4 * width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        recon = self.generator(x)
        f_x, f_r = self.features(torch.cat([x, recon])).chunk(2)  # one backbone pass for both
        return x, recon, f_x, f_r


def network(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    s: GanSettings = spec.method
    h, w = spec.input_hw
    if h % 2 ** LEVELS or w % 2 ** LEVELS:
        raise ValueError(f"model.input_size {[h, w]}: gan needs multiples of {2 ** LEVELS}")
    backbone = make_backbone(spec.backbone, Path(weights) if weights else None, pretrained=pretrained)
    features = FeatureNet(backbone, FeatureSpec(spec.backbone, FEATURE_TAPS))
    return ReconstructionGan(features, s.width, s.latent_dim)


def head(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    return GanHead(**{name: tensors[name] for name in STATISTICS})


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True)


def residual_terms(x: torch.Tensor, recon: torch.Tensor, f_x: torch.Tensor,
                   f_r: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - SSIM pooled to the feature grid, squared feature distance), each (B, h, w)."""
    ssim = 1.0 - ssim_map(_grey(x), _grey(recon), window, DATA_RANGE)
    ssim = F.avg_pool2d(ssim, MAP_STRIDE)[:, 0]
    feat = (f_x - f_r).pow(2).mean(1)
    if feat.shape[-2:] != ssim.shape[-2:]:
        feat = F.interpolate(feat[:, None], size=ssim.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return ssim, feat


class GanHead(nn.Module):
    """Each term standardised per map position by its mean and deviation on held-out good inputs,
    then averaged: what is usual at a place (a border, the rim of a part) counts as usual there."""

    def __init__(self, ssim_mean: torch.Tensor, ssim_std: torch.Tensor, feature_mean: torch.Tensor,
                 feature_std: torch.Tensor) -> None:
        super().__init__()
        for name, value in zip(STATISTICS, (ssim_mean, ssim_std, feature_mean, feature_std)):
            self.register_buffer(name, value.float())
        self.register_buffer("window", gaussian_window(), persistent=False)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        return standardised(*residual_terms(*outputs, self.window), self.ssim_mean, self.ssim_std,
                            self.feature_mean, self.feature_std)


def standardised(ssim: torch.Tensor, feat: torch.Tensor, ssim_mean: torch.Tensor, ssim_std: torch.Tensor,
                 feature_mean: torch.Tensor, feature_std: torch.Tensor) -> torch.Tensor:
    """The map: both terms standardised per position, averaged."""
    return 0.5 * ((ssim - ssim_mean) / ssim_std + (feat - feature_mean) / feature_std)


# --- fit -------------------------------------------------------------------------------------------

def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))  # the usual GAN momentum


def augmented_crops(images: torch.Tensor, n: int, side: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random ``side`` crops of uint8 (N, H, W, 3) ``images``, randomly flipped and turned."""
    _, h, w, _ = images.shape
    out = []
    for _ in range(n):
        i = int(torch.randint(len(images), (), generator=gen))
        y, x = int(torch.randint(h - side + 1, (), generator=gen)), int(torch.randint(w - side + 1, (), generator=gen))
        crop = images[i, y:y + side, x:x + side]
        if float(torch.rand((), generator=gen)) < 0.5:
            crop = crop.flip(1)
        crop = torch.rot90(crop, int(torch.randint(4, (), generator=gen)), dims=(0, 1))
        out.append(crop)
    return torch.stack(out).contiguous()


def fit(spec: ModelSpec, context: FitContext) -> Fitted:
    t: GanSettings = spec.method
    device = train_device()
    gen = seed_everything(context.seed)
    graph = pretrained_graph(spec, network, context.weights, device)
    net: ReconstructionGan = graph.network
    net.features.requires_grad_(False)
    keep = lambda x: x  # noqa: E731 - inputs stay uint8 in memory; crops are normalised per batch
    images = load_all(context.train, "images", keep)
    if spec.coarse_weight > 0:  # the coarse pass scores whole frames: the generator learns them too
        images = torch.cat([images, load_all(context.train.whole_frames(), "whole frames", keep)])
    held = _held_out(context, graph, gen)  # drawn either way: both criteria train the same path
    validation = None
    if t.stop_on == "detection":
        if context.validation is None or not len(context.validation):
            raise ValueError("model.method.stop_on: detection needs synthetic defects to find; "
                             "model.validation_defects is 0")
        validation = prepare_validation(context.validation, lambda x: x, context.batch_size, device)
    side = min(t.crop, *spec.input_hw)
    window = gaussian_window().to(device)
    opt_g, opt_d = adam(net.generator.parameters(), t.lr), adam(net.discriminator.parameters(), t.lr)

    def repair_loss(damaged: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon = net.generator(damaged)
        ssim = 1.0 - ssim_map(_grey(recon), _grey(clean), window, DATA_RANGE).mean()
        rec = (recon - clean).abs().mean() + ssim
        backbone = net.features.backbone
        with torch.no_grad():
            f_clean = backbone(clean, (LOSS_TAP,))[0]
        feat = (backbone(recon, (LOSS_TAP,))[0] - f_clean).pow(2).mean()
        return recon, rec, feat

    def step(indices: torch.Tensor) -> dict[str, float]:
        clean = graph.normalise(augmented_crops(images, len(indices), side, gen).to(device))
        damaged = corrupt(clean, gen, t.corruption)
        recon, rec, feat = repair_loss(damaged, clean)
        g_loss = t.reconstruction_weight * rec + t.feature_weight * feat
        d_loss = torch.zeros(())
        if t.adversarial_weight > 0:
            logit_x, logit_r = net.discriminator(torch.cat([clean, recon.detach()]))[0].chunk(2)
            d_loss = bce(logit_x, 1.0) + bce(logit_r, 0.0)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            g_loss = g_loss + t.adversarial_weight * bce(net.discriminator(recon)[0], 1.0)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"rec": rec.item(), "feat": feat.item(), "d": d_loss.item()}

    def repair_error() -> float:
        total = 0.0
        for clean, damaged in zip(batched(held[0], t.batch_size, device), batched(held[1], t.batch_size, device)):
            _, rec, feat = repair_loss(damaged, clean)
            total += float(t.reconstruction_weight * rec + t.feature_weight * feat) * len(clean)
        return total / len(held[0])

    def detection_error() -> float:
        ssim, feat = _terms(graph, validation.inputs, t.batch_size, device, window)
        good = ~validation.labels
        stats = _position_statistics(ssim[good], feat[good])
        return validation.error_of(standardised(ssim, feat, *(stats[name] for name in STATISTICS)))

    criterion = detection_error if validation is not None else repair_error
    # An epoch: one random crop per input, at most epoch_inputs (thousands of tiles would leave a
    # 15-minute budget one validation). fit_loop orders these indices; each step draws its crops.
    epoch = torch.arange(min(t.epoch_inputs, len(images)))
    log = fit_loop({"generator": net.generator, "discriminator": net.discriminator}, epoch, step, criterion,
                   t.epochs, t.patience, t.batch_size, gen, device, "gan training", context.progress,
                   t.max_minutes * 60, t.weight_average)
    stats_inputs = load_all(context.held_out, "images (statistics)", keep)
    if len(stats_inputs) > STATS_INPUTS:
        stats_inputs = stats_inputs[torch.randperm(len(stats_inputs), generator=gen)[:STATS_INPUTS]]
    head_tensors = _statistics(graph, stats_inputs, t.batch_size, device, window)
    state = {k: v.detach().cpu().contiguous() for k, v in graph.cpu().state_dict().items()}
    return Fitted(network_state=state, head_tensors=head_tensors,
                  info={"samples": len(context.train), "inputs": len(images), **log.to_dict()})


def _held_out(context: FitContext, graph: EngineGraph, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, damaged) normalised held-out inputs, at most HELD_OUT_INPUTS, damaged once with a
    fixed seed so every epoch is judged on the same defects."""
    held = load_all(context.held_out, "images (held out)", lambda x: x)
    if len(held) > HELD_OUT_INPUTS:
        held = held[torch.randperm(len(held), generator=gen)[:HELD_OUT_INPUTS]]
    with torch.no_grad():
        clean = graph.normalise(held.to(graph.mean.device)).cpu()
    return clean, corrupt(clean, torch.Generator().manual_seed(0), 1.0)


@torch.no_grad()
def _statistics(graph: EngineGraph, held: torch.Tensor, batch_size: int, device: torch.device,
                window: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head's statistics from held-out good uint8 inputs."""
    return _position_statistics(*_terms(graph, held, batch_size, device, window))


@torch.no_grad()
def _terms(graph: EngineGraph, inputs: torch.Tensor, batch_size: int, device: torch.device,
           window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both residual terms of uint8 ``inputs``, (N, h, w) each, on the CPU."""
    terms: list[list[torch.Tensor]] = [[], []]
    for x in batched(inputs, batch_size, device):
        for acc, term in zip(terms, residual_terms(*graph(x), window)):
            acc.append(term.cpu())
    return torch.cat(terms[0]), torch.cat(terms[1])


def _position_statistics(ssim: torch.Tensor, feat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position mean and deviation of both terms on good inputs, smoothed over 3x3 positions;
    deviations floored so that no position divides by ~0."""
    out = {}
    for name, t in (("ssim", ssim), ("feature", feat)):
        mean = F.avg_pool2d(t.mean(0)[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
        std = F.avg_pool2d(t.std(0)[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
        out[f"{name}_mean"], out[f"{name}_std"] = mean, floored_spread(std)
    return out
