"""Exporting the engine network to ONNX with a dynamic batch axis."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17


def export_onnx(net: nn.Module, path: Path, input_hw: tuple[int, int]) -> Path:
    net = net.eval().cpu()
    dummy = torch.zeros(2, 3, *input_hw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = net(dummy)
        n_out = len(out) if isinstance(out, (tuple, list)) else 1
        names = [f"output{i}" for i in range(n_out)]
        torch.onnx.export(net, (dummy,), str(path), input_names=["input"], output_names=names,
                          dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=OPSET, dynamo=False)
    return path
