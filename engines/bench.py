"""``bench``: images/s, p50/p99 latency, per-stage times and peak memory of the frame path.

Each backend scores the same encoded images through the ``Pipeline`` the service runs
(engines/pipeline.py): ``decode`` (JPEG/PNG bytes -> image, OpenCV) is bench's own stage, then
the pipeline's ``prepare``, ``network``, ``head``, ``postprocess``, ``stitch``, ``download``
(and ``mask``). A call scores ``batch`` frames, their tiles batched together. With several
backends in one run, ``ratio_to_torch_cpu`` divides each backend's images/s by that of the
torch eager CPU path (backend ``torch``) measured in the same run.

Backends by bench name: ``torch`` (eager CPU, the reference), ``onnxruntime``,
``onnxruntime-int8`` (after ``python -m calibration.quantize``), ``torch-cuda``, ``torch-fp16``
(CUDA: half weights, channels-last, CUDA graphs per batch size), ``tensorrt`` (a plan from
build-engine), ``auto``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from engines.bundle import Bundle, load_bundle
from engines.pipeline import Pipeline
from engines.runtimes import BackendError, RuntimeSettings, open_backend

STAGES = ("decode", "prepare", "network", "head", "postprocess", "stitch", "download", "mask")
REFERENCE = "torch"


def runtime_for(name: str, batch: int, threads: int) -> RuntimeSettings:
    """The runtime settings a bench backend name stands for (no fallback: a bench measures one)."""
    backends: dict[str, Any] = {
        "auto": "auto", "torch": {"kind": "torch"}, "torch-cuda": {"kind": "torch", "channels_last": True},
        "torch-fp16": {"kind": "torch", "half": True, "channels_last": True, "cuda_graphs": [batch]},
        "onnxruntime": "onnxruntime", "onnxruntime-int8": {"kind": "onnxruntime", "network": "int8"},
        "tensorrt": {"kind": "tensorrt", "cuda_graphs": [batch]},
    }
    if name not in backends:
        raise ValueError(f"--backend: unknown {name!r}; known: {', '.join(backends)}")
    device = "cuda" if name in ("torch-cuda", "torch-fp16", "tensorrt") else "cpu" if name == "torch" else "auto"
    return RuntimeSettings.model_validate({"backend": backends[name], "device": device, "threads": threads,
                                           "fallback": False, "batch_size": batch})


@dataclass
class BenchResult:
    backend: str
    batch: int
    images_per_s: float
    latency_ms: dict[str, float]                 # p50, p99, mean per call of ``batch`` frames
    stages_ms: dict[str, float]                  # mean per call
    peak_host_rss_mb: float
    peak_device_mb: float | None
    iterations: int
    notes: list[str] = field(default_factory=list)


def command(args: argparse.Namespace, cfg: Any) -> int:
    backends = tuple(b.strip() for b in args.backend.split(",") if b.strip())
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise ValueError(f"--batch must be a comma list of integers, got {args.batch!r}") from None
    if min(batches) < 1 or args.iterations < 1:
        raise ValueError("--batch sizes and --iterations must be at least 1")
    for name in backends:
        runtime_for(name, 1, 0)  # an unknown name is refused before any work
    report = run_bench(load_bundle(args.model), backends, batches, args.iterations, args.warmup,
                       cfg.runtime.threads, args.data, progress=sys.stderr.isatty())
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def run_bench(bundle: Bundle, backends: tuple[str, ...], batches: tuple[int, ...], iterations: int = 20,
              warmup: int = 2, threads: int = 0, data: Path | None = None,
              progress: bool = False) -> dict[str, Any]:
    frames = encoded_frames(bundle, data, max(batches))
    results: list[BenchResult] = []
    skipped: dict[str, str] = {}
    for name in backends:
        for batch in batches:
            reset_peak_rss()
            try:
                backend, _ = open_backend(bundle, runtime_for(name, batch, threads))
            except BackendError as e:
                skipped[name] = str(e)
                break
            pipeline = Pipeline(bundle, backend, runtime_for(name, batch, threads), use_mask=False)
            results.append(bench_one(pipeline, name, frames, batch, iterations, warmup, progress))
            del pipeline, backend
    return {"model_id": bundle.manifest.model_id, "method": bundle.manifest.method,
            "input_hw": list(bundle.manifest.input_hw), "tiled": bundle.manifest.model.tiling.enabled,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "data": str(data) if data else "synthetic",
            "results": [asdict(r) for r in results], "skipped": skipped, "ratio_to_torch_cpu": ratios(results)}


def bench_one(pipeline: Pipeline, name: str, frames: list[bytes], batch: int, iterations: int, warmup: int,
              progress: bool) -> BenchResult:
    cuda = pipeline.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(pipeline.device)
    latencies, stages = [], {s: 0.0 for s in STAGES}
    for it in tqdm(range(warmup + iterations), desc=f"{name} b{batch}", disable=not progress, leave=False):
        chunk = [frames[(it * batch + i) % len(frames)] for i in range(batch)]
        t0 = time.perf_counter()
        images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in chunk]
        decode_ms = (time.perf_counter() - t0) * 1000.0
        scored = pipeline.score(images)
        if it < warmup:
            continue
        latencies.append((time.perf_counter() - t0) * 1000.0)
        stages["decode"] += decode_ms / iterations
        for stage, ms in scored[0].timings_ms.items():  # per frame; a call's stage time is batch x that
            stages[stage] = stages.get(stage, 0.0) + ms * batch / iterations
    lat = np.array(latencies)
    peak_dev = torch.cuda.max_memory_allocated(pipeline.device) / 2**20 if cuda else None
    return BenchResult(name, batch, float(1000.0 * batch / lat.mean()),
                       {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                        "mean": float(lat.mean())},
                       {s: round(v, 3) for s, v in stages.items()}, peak_rss_mb(), peak_dev, iterations,
                       ["p99 of fewer than 100 calls is close to the maximum"] if iterations < 100 else [])


def encoded_frames(bundle: Bundle, data: Path | None, n: int) -> list[bytes]:
    """Encoded frames to decode: image files under ``data``, else synthetic PNGs at 1.5x model size."""
    if data is not None:
        exts = {".png", ".jpg", ".jpeg", ".bmp"}
        paths = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in exts and "ground_truth" not in p.parts)
        if not paths:
            raise FileNotFoundError(f"{data}: no images to benchmark with")
        step = max(1, len(paths) // max(n, 16))
        return [p.read_bytes() for p in paths[::step][:max(n, 16)]]
    rng = np.random.default_rng(0)
    h, w = (int(s * 1.5) for s in bundle.manifest.input_hw)
    out = []
    for _ in range(max(n, 4)):
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
        out.append(cv2.imencode(".png", img)[1].tobytes())
    return out


def ratios(results: list[BenchResult]) -> dict[str, dict[str, float]]:
    """images/s of each backend over the torch eager CPU path's, per batch size, from this run."""
    ref = {r.batch: r.images_per_s for r in results if r.backend == REFERENCE}
    out: dict[str, dict[str, float]] = {}
    for r in results:
        if r.backend != REFERENCE and r.batch in ref:
            out.setdefault(r.backend, {})[str(r.batch)] = round(r.images_per_s / ref[r.batch], 3)
    return out


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux), so each backend's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['model_id']} {report['input_hw']} on {report['device']} ({report['threads']} threads, "
             f"load {report['load_average'][0]:.2f})",
             f"{'backend':<18}{'batch':>6}{'img/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'rss MB':>9}  "
             + " ".join(f"{s:>11}" for s in STAGES)]
    for r in report["results"]:
        lines.append(f"{r['backend']:<18}{r['batch']:>6}{r['images_per_s']:>9.2f}{r['latency_ms']['p50']:>10.1f}"
                     f"{r['latency_ms']['p99']:>10.1f}{r['peak_host_rss_mb']:>9.0f}  "
                     + " ".join(f"{r['stages_ms'].get(s, 0.0):>11.2f}" for s in STAGES))
    for name, why in report["skipped"].items():
        lines.append(f"{name}: skipped ({why})")
    for name, per in report["ratio_to_torch_cpu"].items():
        lines.append(f"{name} vs torch eager CPU: " + ", ".join(f"batch {b}: x{v}" for b, v in per.items()))
    return "\n".join(lines)
