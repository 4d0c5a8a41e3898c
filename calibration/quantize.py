"""``python -m calibration.quantize``: write the bundle's INT8 score graph, and measure what it costs.

    python -m calibration.quantize --model BUNDLE --data DIR [--runtime onnxruntime|openvino]
                                   [--images 32] [--measure]

``--runtime onnxruntime`` writes model.int8.onnx (ONNX Runtime static quantisation), ``openvino``
writes model.int8.xml/.bin (NNCF post-training quantisation); both quantise the network only
(engines/quantize.py). ``--measure`` evaluates DIR/test with the FP32 and the INT8 graph on that
runtime and prints both metric sets and their difference: quantisation changes scores, so it is
accepted on measured accuracy, not on parity. Serve it with ``runtime.backend: {kind:
onnxruntime, network: int8}`` or ``{kind: openvino, precision: int8}``.
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
from engines.quantize import INT8_FILES, quantize_bundle
from engines.runtimes import RuntimeSettings, open_backend

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max", "ms_per_image")
BACKENDS = {"onnxruntime": ({"kind": "onnxruntime"}, {"kind": "onnxruntime", "network": "int8"}),
            "openvino": ({"kind": "openvino"}, {"kind": "openvino", "precision": "int8"})}


def measure(bundle: Bundle, data: Path, runtime: str) -> dict[str, Any]:
    """evaluate() on DIR/test with the FP32 and the INT8 graph on ``runtime``; overall metrics and the change."""
    out: dict[str, Any] = {}
    for label, backend in zip(("fp32", "int8"), BACKENDS[runtime]):
        settings = RuntimeSettings.model_validate({"backend": backend, "fallback": False})
        opened, _ = open_backend(bundle, settings)
        ev = evaluate(bundle, Pipeline(bundle, opened, settings), data, progress=sys.stderr.isatty())
        s = ev.summary(bundle, opened.name)
        out[label] = {k: s[k] for k in KEYS}
    out["int8_minus_fp32"] = {k: out["int8"][k] - out["fp32"][k] for k in KEYS}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="DIR/train/good: calibration images")
    p.add_argument("--runtime", choices=tuple(INT8_FILES), default="onnxruntime")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--measure", action="store_true", help="evaluate DIR/test with both graphs")
    args = p.parse_args(argv)
    bundle = quantize_bundle(load_bundle(args.model), args.data, args.images, args.runtime)
    int8 = bundle.path / INT8_FILES[args.runtime]
    result: dict[str, Any] = {"bundle": str(bundle.path), "model_id": bundle.manifest.model_id,
                              "int8_graph": int8.name, "int8_bytes": sum(
                                  f.stat().st_size for f in (int8, int8.with_suffix(".bin")) if f.is_file()),
                              "fp32_onnx_bytes": bundle.onnx_path.stat().st_size}
    if args.measure:
        result["accuracy"] = measure(bundle, args.data, args.runtime)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
