"""Optional INT8 network for the CPU path: ONNX Runtime static quantisation of the bundle's ONNX.

Calibration uses good training images, preprocessed exactly as the scorer does, and writes
``model.int8.onnx`` into the bundle (the manifest is re-hashed: the bundle's hashes cover every
file, so the model id changes). Served by ``OrtBackend(OrtBackendConfig(model="model.int8.onnx"))``
and ``bench --backend onnxruntime-int8``. The head stays FP32.

    python -m engines.quantize --model BUNDLE --data DIR [--images 32] [--measure]

``--measure`` evaluates DIR/test with the FP32 and the INT8 network and prints both metric sets
and their difference: quantisation changes scores, so it is accepted on measured accuracy,
not on parity.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from engines.bundle import Bundle, load_bundle, write_manifest

INT8_ONNX = "model.int8.onnx"


class _Batches(CalibrationDataReader):
    """onnxruntime.quantization.CalibrationDataReader over normalised good-image batches."""

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


def measure(bundle: Bundle, data: Path) -> dict[str, Any]:
    """evaluate() on DIR/test with the FP32 and the INT8 ONNX network; overall metrics and the change."""
    from calibration.evaluate import evaluate
    from engines.runtimes.onnxruntime_backend import OrtBackend, OrtBackendConfig
    from engines.scorer import Scorer

    keys = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "ms_per_image")
    out: dict[str, Any] = {}
    for model in ("model.onnx", INT8_ONNX):
        ev = evaluate(bundle, Scorer(bundle, OrtBackend(bundle, OrtBackendConfig(model=model))), data,
                      progress=sys.stderr.isatty())
        s = ev.summary(bundle, model)
        out[model] = {k: s[k] for k in keys}
    out["int8_minus_fp32"] = {k: out[INT8_ONNX][k] - out["model.onnx"][k] for k in keys}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="DIR/train/good: calibration images")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--measure", action="store_true", help="evaluate DIR/test with both networks")
    args = p.parse_args(argv)
    bundle = quantize_bundle(load_bundle(args.model), args.data, args.images)
    result: dict[str, Any] = {"bundle": str(bundle.path), "model_id": bundle.manifest.model_id,
                              "int8_onnx_bytes": (bundle.path / INT8_ONNX).stat().st_size,
                              "fp32_onnx_bytes": bundle.onnx_path.stat().st_size}
    if args.measure:
        result["accuracy"] = measure(bundle, args.data)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
