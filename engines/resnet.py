"""ResNet backbones with torchvision's module names, tapped for intermediate features.

torchvision does not import on the target machines, so the two architectures we use are
defined here with exactly torchvision's module and parameter names: a torchvision ``.pth``
state dict (``resnet18-*.pth``, ``wide_resnet50_2-*.pth``) loads strictly with `load_weights`.

Taps (names shared by every backbone):

    stem    relu(bn1(conv1(x)))           stride 2, before the max pool
    layer1  maxpool then layer1           stride 4
    layer2 .. layer4                      stride 8, 16, 32

``forward(x, taps)`` returns the requested maps in the order asked and stops after the
deepest requested tap. ``avgpool`` and ``fc`` exist only so that state dicts load strictly;
they are never run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

TAPS = ("stem", "layer1", "layer2", "layer3", "layer4")
_STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, width_per_group: int = 64) -> None:
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 width_per_group: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self._block, self._width_per_group, self._cin = block, width_per_group, 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.tap_channels: dict[str, int] = {
            "stem": 64, **{f"layer{i + 1}": p * block.expansion for i, p in enumerate((64, 128, 256, 512))}}
        self.tap_strides: dict[str, int] = dict(_STRIDES)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        cout = planes * self._block.expansion
        downsample = None
        if stride != 1 or self._cin != cout:
            downsample = nn.Sequential(_conv1x1(self._cin, cout, stride), nn.BatchNorm2d(cout))
        layers = [self._block(self._cin, planes, stride, downsample, self._width_per_group)]
        self._cin = cout
        layers += [self._block(cout, planes, width_per_group=self._width_per_group) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's initialisation, so random-weight models behave like theirs in tests.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, taps: tuple[str, ...]) -> list[Tensor]:
        unknown = [t for t in taps if t not in TAPS]
        if unknown or not taps:
            raise ValueError(f"taps must be a non-empty subset of {TAPS}, got {taps!r}")
        deepest = max(TAPS.index(t) for t in taps)
        stages = (lambda y: self.relu(self.bn1(self.conv1(y))),
                  lambda y: self.layer1(self.maxpool(y)),
                  self.layer2, self.layer3, self.layer4)
        features: dict[str, Tensor] = {}
        for name, stage in zip(TAPS[: deepest + 1], stages):
            x = stage(x)
            features[name] = x
        return [features[t] for t in taps]


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width_per_group=128)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a torchvision-format state dict from ``path`` into ``model``, strictly.

    BatchNorm ``num_batches_tracked`` buffers may be absent (older torchvision files); they
    are not used in eval mode, so the model's own values are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-tensor pickles
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"weights file {path} does not hold a state dict (name -> tensor), "
                         f"got {type(state).__name__}")
    own = model.state_dict()
    state = dict(state)
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights file {path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}), "
            f"{len(mismatched)} shape mismatches (e.g. {mismatched[:5]})")
    model.load_state_dict(state, strict=True)
