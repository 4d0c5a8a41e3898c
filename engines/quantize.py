"""INT8 score graphs for the CPU: the network quantised, the head and the upsample kept in FP32.

Two runtimes, two artefacts, the same recipe: calibration on good training images prepared
exactly as the pipeline prepares frames, the head statistics fed as they are at run time, and
every node outside the engine graph's scope (``/graph/engine/``: normalisation and network)
excluded, so distances are never computed in INT8.

    onnxruntime  model.int8.onnx   ONNX Runtime static quantisation (QDQ, per-channel S8
                                   weights, U8 activations, min-max calibration)
    openvino     model.int8.xml    NNCF post-training quantisation of the OpenVINO model

Both stay graphs with the statistics as inputs, so a recalibration that keeps the network keeps
them. Writing one re-hashes the manifest (the bundle's hashes cover every file, so the model id
changes). The command, with ``--measure`` comparing the metrics, is calibration/quantize.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from engines.bundle import Bundle, write_manifest
from engines.runtimes.base import statistics
from engines.score import graph_inputs

log = logging.getLogger(__name__)

INT8_ONNX = "model.int8.onnx"
INT8_IR = "model.int8.xml"
ENGINE_SCOPE = "/graph/engine/"
INT8_FILES = {"onnxruntime": INT8_ONNX, "openvino": INT8_IR}


def quantize_bundle(bundle: Bundle, data: Path, images: int = 32,
                    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime") -> Bundle:
    """Write the runtime's INT8 graph into the bundle; returns the re-hashed bundle."""
    if runtime == "onnxruntime":
        _onnxruntime_int8(bundle, data, images)
    elif runtime == "openvino":
        _openvino_int8(bundle, data, images)
    else:
        raise ValueError(f"quantize: runtime must be onnxruntime or openvino, got {runtime!r}")
    return write_manifest(bundle.path, bundle.manifest)


def calibration_feeds(bundle: Bundle, data: Path, images: int) -> Iterator[dict[str, np.ndarray]]:
    """Graph feeds for calibration: a frame's worth of uint8 tiles (one tile, or a frame's tiles when
    statistics are per tile position) and the bundle's statistics."""
    from engines.build import calibration_batches
    from engines.tiling import make_grid

    m = bundle.manifest
    batch = len(make_grid(tuple(m.frame_size), m.input_hw, m.model.tiling)) if m.model.per_position else 1
    stats = statistics(bundle, graph_inputs(bundle.onnx_path)[1:])
    for x in calibration_batches(bundle, data, images, batch):
        yield {"input": x.numpy(), **stats}


def _onnxruntime_int8(bundle: Bundle, data: Path, images: int) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = calibration_feeds(bundle, data, images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    graph = onnx.load(str(bundle.onnx_path), load_external_data=False).graph
    head = [n.name for n in graph.node if not n.name.startswith(ENGINE_SCOPE)]
    log.info("onnxruntime int8: quantising the network, %d head and upsample nodes stay FP32", len(head))
    quantize_static(str(bundle.onnx_path), str(bundle.path / INT8_ONNX), Feeds(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=head)


def _openvino_int8(bundle: Bundle, data: Path, images: int) -> None:
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise ValueError("quantize --runtime openvino needs the openvino and nncf packages "
                         "(pip install 'inspection-agent[int8]')") from None
    model = ov.Core().read_model(str(bundle.onnx_path))
    feeds = list(calibration_feeds(bundle, data, images))
    # OpenVINO names the operations after the ONNX nodes; everything outside the engine graph is ignored.
    ignored = nncf.IgnoredScope(patterns=[f"^(?!{ENGINE_SCOPE}).*"], validate=False)
    quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), ignored_scope=ignored)
    ov.save_model(quantized, str(bundle.path / INT8_IR), compress_to_fp16=False)
