"""Synthetic defects the reconstruction GAN learns to remove, made on the fly on a batch of crops.

calibration/defects.py makes defects for thresholds on whole images (OpenCV, numpy); this is
the training-time counterpart on normalised torch batches, thousands per minute, and it lives
in ``engines`` because fitting does (engines imports nothing from calibration).

A defect is a noisy-edged ellipse, from a round blob (blowhole, stain) to a one-pixel line
(crack, scratch), filled with one of: another crop's texture (a patch that does not belong),
a darker or brighter surface, or a contrast and noise change. It is blended in with a random
opacity, so faint defects are learned too. Deterministic given the generator.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def defect_mask(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(h, w) float mask in [0, 1]: one rotated ellipse, its edge perturbed by smooth noise."""
    side = min(h, w)
    a = math.exp(_uniform(gen, math.log(2.0), math.log(side / 3)))        # half length
    b = max(0.7, a * math.exp(_uniform(gen, math.log(0.05), 0.0)))        # half width: crack .. blob
    cy, cx = _uniform(gen, 0, h - 1), _uniform(gen, 0, w - 1)
    angle = _uniform(gen, 0, math.pi)
    ys = torch.arange(h, dtype=torch.float32)[:, None] - cy
    xs = torch.arange(w, dtype=torch.float32)[None, :] - cx
    u = xs * math.cos(angle) + ys * math.sin(angle)
    v = -xs * math.sin(angle) + ys * math.cos(angle)
    r = (u / a) ** 2 + (v / b) ** 2
    noise = torch.rand(1, 1, 6, 6, generator=gen)
    noise = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    return ((r + 0.6 * (noise - 0.5)) < 1.0).float()


def corrupt(x: torch.Tensor, gen: torch.Generator, share: float) -> torch.Tensor:
    """A copy of the normalised batch ``x`` (B, C, H, W) with a defect in about ``share`` of its
    images. Other images of the batch lend their texture."""
    out = x.clone()
    b, _, h, w = x.shape
    for i in range(b):
        if float(torch.rand((), generator=gen)) >= share:
            continue
        for _ in range(int(torch.randint(1, 3, (), generator=gen))):
            mask = defect_mask(h, w, gen).to(x.device, x.dtype)
            fill = _fill(x, i, gen)
            alpha = _uniform(gen, 0.5, 1.0) * mask
            out[i] = out[i] * (1 - alpha) + fill * alpha
    return out


def _fill(x: torch.Tensor, i: int, gen: torch.Generator) -> torch.Tensor:
    kind = int(torch.randint(3, (), generator=gen))
    if kind == 0:  # a patch that does not belong: another crop, shifted
        j = int(torch.randint(len(x), (), generator=gen))
        dy, dx = (int(torch.randint(s, (), generator=gen)) for s in x.shape[-2:])
        return torch.roll(x[j], shifts=(dy, dx), dims=(-2, -1))
    if kind == 1:  # darker or brighter (holes, stains, wear)
        sign = 1.0 if float(torch.rand((), generator=gen)) < 0.5 else -1.0
        return x[i] + sign * _uniform(gen, 0.2, 1.0)
    # contrast and grain change (rough or polished surface)
    mean = x[i].mean()
    noise = torch.randn(x[i].shape, generator=gen).to(x.device, x.dtype)
    return mean + (x[i] - mean) * _uniform(gen, 0.0, 2.5) + _uniform(gen, 0.0, 0.3) * noise
