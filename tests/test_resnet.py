"""ResNet backbones: torchvision-compatible shapes and names, strict weight loading, ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from engines.resnet import TAPS, load_weights, resnet18, wide_resnet50_2

EXPECTED_CHANNELS = {
    resnet18: {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    wide_resnet50_2: {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
EXPECTED_STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
# Parameter counts of torchvision's models, a cheap check that the architectures are theirs.
TORCHVISION_PARAMETERS = {resnet18: 11_689_512, wide_resnet50_2: 68_883_240}


@pytest.mark.parametrize("factory", [resnet18, wide_resnet50_2])
def test_taps_have_documented_channels_and_strides(factory) -> None:
    model = factory().eval()
    assert model.tap_channels == EXPECTED_CHANNELS[factory]
    assert model.tap_strides == EXPECTED_STRIDES
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[factory]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 256, 256), TAPS)
    for tap, fmap in zip(TAPS, maps):
        side = 256 // EXPECTED_STRIDES[tap]
        assert tuple(fmap.shape) == (1, EXPECTED_CHANNELS[factory][tap], side, side), tap


def test_taps_come_back_in_the_order_asked_and_deeper_stages_do_not_run() -> None:
    model = resnet18().eval()
    ran: list[str] = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda *_, name=name: ran.append(name))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        layer2, stem = model(x, ("layer2", "stem"))
        reference = model(x, TAPS)
    assert ran[:2] == ["layer1", "layer2"] and "layer3" not in ran[:2]
    assert ran[2:] == ["layer1", "layer2", "layer3", "layer4"]
    assert torch.equal(layer2, reference[2]) and torch.equal(stem, reference[0])


def test_unknown_tap_is_refused() -> None:
    with pytest.raises(ValueError, match="layer5"):
        resnet18()(torch.randn(1, 3, 32, 32), ("layer5",))


def test_state_dict_round_trips_strictly(tmp_path: Path) -> None:
    source, target = resnet18().eval(), resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    load_weights(target, path)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(source(x, TAPS), target(x, TAPS)):
            assert torch.equal(a, b)


def test_state_dict_without_num_batches_tracked_loads(tmp_path: Path) -> None:
    # Older torchvision files predate the num_batches_tracked buffers.
    state = {k: v for k, v in resnet18().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    model = resnet18()
    load_weights(model, path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_weights(resnet18(), path)


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pth"
    torch.save(resnet18().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_weights(resnet18(), path)


def test_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match=r"list\.pth does not hold a state dict"):
        load_weights(resnet18(), path)


def test_other_architecture_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"r18\.pth does not fit") as error:
        load_weights(wide_resnet50_2(), path)
    message = str(error.value)
    assert "layer1.0.conv3.weight" in message  # missing: resnet18 has no third conv
    assert "shape mismatches" in message


def test_shape_mismatch_is_listed(tmp_path: Path) -> None:
    state = resnet18().state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "fc10.pth"
    torch.save(state, path)
    expected = r"1 shape mismatches \(e\.g\. \['fc\.weight \(10, 512\) != \(1000, 512\)'\]"
    with pytest.raises(ValueError, match=expected):
        load_weights(resnet18(), path)


class _Tapped(nn.Module):
    """Fixes the taps so the backbone traces as a tensor-in, tensors-out graph."""

    def __init__(self, backbone: nn.Module, taps: tuple[str, ...]) -> None:
        super().__init__()
        self.backbone, self.taps = backbone, taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x, self.taps)


def test_onnx_runtime_matches_torch(tmp_path: Path) -> None:
    taps = ("stem", "layer1", "layer2", "layer3")
    model = _Tapped(resnet18(), taps).eval()
    x = torch.randn(2, 3, 128, 128)
    path = tmp_path / "resnet18.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=list(taps),
                      dynamic_axes={"image": {0: "batch"}, **{t: {0: "batch"} for t in taps}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A different batch size than exported with: the batch axis really is dynamic.
    x = torch.randn(3, 3, 128, 128)
    got = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert [o.shape for o in got] == [tuple(w.shape) for w in want]
    for tap, g, w in zip(taps, got, want):
        w = w.numpy()
        relative = np.abs(g - w).max() / np.abs(w).max()
        assert relative < 1e-4, f"{tap}: relative error {relative:.2e}"
