"""``build-engine``: compile the bundle's score graph into a TensorRT plan for this GPU (offline, once per device)

Steps: make sure the bundle holds the score graph as ONNX with a dynamic batch axis (re-exported
from the bundle's tensors if not), then, where the ``tensorrt`` module imports and torch sees a
CUDA device, build a serialized plan with the TensorRT 10 Python API (optimisation profile for
batch 1..N and the head statistics' shapes, FP16 or INT8 with an entropy calibrator fed by good
images for the network while the head stays FP32, a timing cache kept beside the plans) and write
it with its manifest to ``BUNDLE/plans``.

TensorRT cannot be installed in the workplace this was written in: the build code follows
the TensorRT 10 API but has not been run (see docs/engines.md).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from engines.bundle import Bundle, load_bundle, sha256, write_manifest
from engines.plan import (PlanManifest, batch_profile, plan_name, plan_paths, statistic_shapes,
                          write_plan_manifest)

log = logging.getLogger(__name__)

EXIT_UNAVAILABLE = 3  # the build cannot run on this machine (no TensorRT, no CUDA device)
TIMING_CACHE = "timing.cache"


def command(args: argparse.Namespace, cfg: Any) -> int:
    profile = batch_profile(args.batch)  # argument errors first, before any work
    if args.precision == "int8" and args.data is None:
        raise ValueError("build-engine --precision int8 needs --data DIR with good images for calibration")
    bundle = load_bundle(args.model)
    onnx_path = ensure_score_onnx(bundle)
    try:
        import tensorrt as trt
    except ImportError:
        print(f"build-engine: TensorRT is not installed here (pip install 'tensorrt>=10,<11' on a machine with "
              f"an NVIDIA GPU); the ONNX network is ready at {onnx_path}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not torch.cuda.is_available():
        print("build-engine: torch sees no CUDA device; a TensorRT plan can only be built on the GPU it will "
              "run on", file=sys.stderr)
        return EXIT_UNAVAILABLE
    plan, manifest = build_plan(trt, bundle, args.precision, profile, args.data, args.calibration_images,
                                args.workspace_mb << 20)
    print(f"{plan} ({manifest.precision}, batch 1..{manifest.max_batch}, {manifest.gpu_name}, "
          f"TensorRT {manifest.tensorrt_version}, {manifest.build_s:.0f} s)")
    return 0


def is_score_graph(onnx_path: Path) -> bool:
    """Whether the file is a score graph (outputs map and score) with a dynamic batch axis."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    dynamic = bool(dim0.dim_param) or not dim0.HasField("dim_value")
    return dynamic and [o.name for o in graph.output] == ["map", "score"]


def ensure_score_onnx(bundle: Bundle) -> Path:
    """The bundle's score graph as ONNX; exported (and the manifest re-hashed) if missing."""
    path = bundle.onnx_path
    if path.is_file() and is_score_graph(path):
        return path
    from engines.score import build_score_graph, export_score_onnx
    from engines.tiling import make_grid

    log.info("exporting the score graph to %s", path)
    m = bundle.manifest
    tensors = bundle.head_tensors()
    graph = build_score_graph(m.model, bundle.network_state(), tensors)
    tiles = len(make_grid(tuple(m.frame_size), m.input_hw, m.model.tiling)) if m.model.per_position else 2
    export_score_onnx(graph, tensors, path, example_batch=tiles)
    write_manifest(bundle.path, m)
    return path


def gpu_identity() -> tuple[str, str]:
    """Name and compute capability ("8.6") of torch's current CUDA device."""
    dev = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(dev)
    return torch.cuda.get_device_name(dev), f"{major}.{minor}"


def build_plan(trt: Any, bundle: Bundle, precision: str, profile: dict[str, list[int]], data: Path | None,
               n_calibration: int, workspace_bytes: int) -> tuple[Path, PlanManifest]:
    """Build and write one plan; torch initialises CUDA first, so TensorRT joins its context."""
    torch.cuda.init()
    gpu_name, cc = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{bundle.onnx_path}: TensorRT cannot parse the ONNX network: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    inp = next(t for t in inputs if t.name == "input")
    stat_shapes = statistic_shapes(bundle, [t.name for t in inputs if t.name != "input"])
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    h, w = bundle.manifest.input_hw

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    opt_profile = builder.create_optimization_profile()
    shapes = {k: (v[0], h, w, 3) for k, v in profile.items()}  # uint8 NHWC, as the engine graph takes
    opt_profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    for name, shape in stat_shapes.items():  # fixed: the bundle's statistics, bound once at start-up
        opt_profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(opt_profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers fall back to FP16, not FP32, where faster
        keep_head_fp32(trt, network, config)
    calibrator = None
    if precision == "int8":
        if not builder.platform_has_fast_int8:
            log.warning("%s has no fast INT8; the plan may be slower than FP16", gpu_name)
        config.set_flag(trt.BuilderFlag.INT8)
        cal_batch = min(profile["max"][0], 8)
        cal_profile = builder.create_optimization_profile()
        cal_shape = (cal_batch, h, w, 3)
        cal_profile.set_shape(inp.name, cal_shape, cal_shape, cal_shape)
        for name, shape in stat_shapes.items():
            cal_profile.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(cal_profile)
        name = plan_name(precision, profile["max"][0], cc)
        calibrator = make_calibrator(trt, calibration_batches(bundle, data, n_calibration, cal_batch), cal_batch,
                                     plan_paths(bundle.path, name)[0].with_suffix(".calib"), bundle)
        config.int8_calibrator = calibrator

    cache_path = bundle.path / "plans" / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT could not build a {precision} plan for {bundle.onnx_path} (see its log above)")
    build_s = time.perf_counter() - t0

    name = plan_name(precision, profile["max"][0], cc)
    plan_path, manifest_path = plan_paths(bundle.path, name)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    manifest = PlanManifest(tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
                            precision=precision, input_name=inp.name, input_hw=[h, w], profile=profile,
                            output_names=outputs, onnx_sha256=sha256(bundle.onnx_path), statistics=stat_shapes,
                            plan_sha256=sha256(plan_path), build_s=build_s)
    write_plan_manifest(manifest_path, manifest)
    return plan_path, manifest


def keep_head_fp32(trt: Any, network: Any, config: Any) -> None:
    """Reduced precision for the network only: the head (distances, sums of squares) and the
    upsample stay FP32, as on every other runtime. Layers outside the engine graph's ONNX scope
    ("/graph/engine/...") are pinned to FP32."""
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer.name.startswith("/graph/engine/"):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)


def calibration_paths(data: Path, limit: int) -> list[Path]:
    """Good images for INT8 calibration: DIR/train/good when it exists, else the images in DIR."""
    root = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in exts) if root.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"{root}: no good images for INT8 calibration")
    step = max(1, len(paths) // limit)  # spread over the set rather than the first few files
    return paths[::step][:limit]


def calibration_batches(bundle: Bundle, data: Path, limit: int, batch: int) -> Iterator[torch.Tensor]:
    """uint8 (batch, H, W, 3) batches of good images, prepared exactly as the pipeline prepares
    frames (resized or tiled); only full batches (the calibration profile has one batch size)."""
    import cv2
    import numpy as np

    from engines.pipeline import model_inputs

    m = bundle.manifest
    pending: list[np.ndarray] = []
    for path in calibration_paths(data, limit):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"{path}: cannot read the calibration image")
        pending += model_inputs(image, m.input_hw, m.model.tiling)
        while len(pending) >= batch:
            yield torch.from_numpy(np.stack(pending[:batch]))
            pending = pending[batch:]


def make_calibrator(trt: Any, batches: Iterator[torch.Tensor], batch: int, cache: Path, bundle: Bundle) -> Any:
    """An IInt8EntropyCalibrator2 that hands TensorRT torch CUDA buffers (torch owns the memory): the
    tiles, and the head statistics (the same buffers every batch)."""
    from engines.runtimes.base import statistics

    stats: dict[str, torch.Tensor] = {}

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.current: torch.Tensor | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            x = next(batches, None)
            if x is None:
                return None
            self.current = x.cuda().contiguous()  # kept alive until the next call
            missing = [n for n in names if n != "input" and n not in stats]
            stats.update({n: torch.from_numpy(a).cuda() for n, a in statistics(bundle, missing).items()})
            torch.cuda.current_stream().synchronize()
            return [int((self.current if n == "input" else stats[n]).data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()
