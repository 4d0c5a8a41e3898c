"""Exporting the engine graph to ONNX: uint8 (B, H, W, 3) BGR input with a dynamic batch axis."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17


def export_onnx(net: nn.Module, path: Path, input_hw: tuple[int, int]) -> Path:
    net = net.eval().cpu()
    dummy = torch.zeros(2, *input_hw, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [f"output{i}" for i in range(len(net(dummy)))]
        torch.onnx.export(net, (dummy,), str(path), input_names=["input"], output_names=names,
                          dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=OPSET, dynamo=False)
    return path
