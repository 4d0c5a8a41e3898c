"""``python -m calibration.quantize``: write the bundle's INT8 network, and measure what it costs.

    python -m calibration.quantize --model BUNDLE --data DIR [--images 32] [--measure]

``--measure`` evaluates DIR/test with the FP32 and the INT8 network and prints both metric sets
and their difference: quantisation changes scores, so it is accepted on measured accuracy,
not on parity. Serve it with ``runtime.backend: {kind: onnxruntime, network: int8}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from calibration.evaluate import evaluate
from engines.bundle import Bundle, load_bundle
from engines.pipeline import Pipeline
from engines.quantize import INT8_ONNX, quantize_bundle
from engines.runtimes import RuntimeSettings, open_backend


def measure(bundle: Bundle, data: Path) -> dict[str, Any]:
    """evaluate() on DIR/test with the FP32 and the INT8 ONNX network; overall metrics and the change."""
    keys = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "ms_per_image")
    out: dict[str, Any] = {}
    for network, model in (("fp32", "model.onnx"), ("int8", INT8_ONNX)):
        runtime = RuntimeSettings.model_validate({"backend": {"kind": "onnxruntime", "network": network},
                                                  "fallback": False})
        backend, _ = open_backend(bundle, runtime)
        ev = evaluate(bundle, Pipeline(bundle, backend, runtime), data, progress=sys.stderr.isatty())
        s = ev.summary(bundle, model)
        out[model] = {k: s[k] for k in keys}
    out["int8_minus_fp32"] = {k: out[INT8_ONNX][k] - out["model.onnx"][k] for k in keys}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.quantize", description=__doc__.splitlines()[0])
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
