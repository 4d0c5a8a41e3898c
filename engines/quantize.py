"""Optional INT8 network for the CPU path: ONNX Runtime static quantisation of the bundle's ONNX.

Calibration uses good training images, prepared exactly as the pipeline prepares frames, and writes
``model.int8.onnx`` into the bundle (the manifest is re-hashed: the bundle's hashes cover every
file, so the model id changes). Served by ``runtime.backend: {kind: onnxruntime, network: int8}``
and ``bench --backend onnxruntime-int8``. The head stays FP32.

    python -m calibration.quantize --model BUNDLE --data DIR [--images 32] [--measure]

(the command, with ``--measure`` comparing both networks' metrics, is calibration/quantize.py)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from engines.bundle import Bundle, write_manifest

INT8_ONNX = "model.int8.onnx"


class _Batches(CalibrationDataReader):
    """onnxruntime.quantization.CalibrationDataReader over good-image batches (uint8, as the graph takes)."""

    def __init__(self, bundle: Bundle, data: Path, limit: int, input_name: str) -> None:
        from engines.build import calibration_batches

        self.input_name = input_name
        self.batches = iter(calibration_batches(bundle, data, limit, batch=1))

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.batches, None)
        return None if x is None else {self.input_name: x.numpy()}


def quantize_bundle(bundle: Bundle, data: Path, images: int = 32) -> Bundle:
    """Write BUNDLE/model.int8.onnx (QDQ, per-channel S8 weights, U8 activations, min-max calibration)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    input_name = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    reader = _Batches(bundle, data, images, input_name)
    quantize_static(str(bundle.onnx_path), str(bundle.path / INT8_ONNX), reader,
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return write_manifest(bundle.path, bundle.manifest)
