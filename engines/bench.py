"""``bench``: images/s, p50/p99 latency, per-stage times and peak memory of the frame path.

Each backend scores the same encoded images through the ``Pipeline`` the service runs
(engines/pipeline.py): ``decode`` (JPEG/PNG bytes -> image, OpenCV) is bench's own stage, then
the pipeline's ``prepare``, ``score``, ``stitch``, ``download`` (and ``mask``). A call scores
``batch`` frames, their tiles batched together. ``--rounds N`` repeats the whole set of
backends N times, interleaved (A B A B), and every row records the load average at its end, so
ratios hold on a machine that is busy with something else.

``ratio_to_reference`` divides each backend's images/s by the reference's (``--reference``,
by default ``onnxruntime-previous``: the path before the one-graph score, engines/previous_path.py)
from the same round and batch size; ``stage_ratio_to_reference`` does the same per stage
(reference ms / backend ms). The previous path's ``score`` is split into its ``network``,
``head`` and ``postprocess``.

Backends by bench name: ``torch`` (eager CPU, the reference for parity), ``onnxruntime``,
``onnxruntime-int8``, ``openvino``, ``openvino-bf16``, ``openvino-int8`` (the INT8 graphs after
``python -m calibration.quantize``), ``onnxruntime-previous``, ``torch-cuda``, ``torch-fp16``
(CUDA: half network, channels-last, CUDA graphs per batch size), ``tensorrt`` (a plan from
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
from engines.previous_path import NAME as PREVIOUS
from engines.previous_path import PreviousPath
from engines.runtimes import Backend, BackendError, RuntimeSettings, open_backend

STAGES = ("decode", "prepare", "score", "stitch", "download", "mask")
PREVIOUS_STAGES = ("network", "head", "postprocess")  # the previous path's score, split
REFERENCE = PREVIOUS


def _backends(batch: int) -> dict[str, Any]:
    return {
        "auto": "auto", "torch": {"kind": "torch"}, "torch-cuda": {"kind": "torch", "channels_last": True},
        "torch-fp16": {"kind": "torch", "half": True, "channels_last": True, "cuda_graphs": [batch]},
        "onnxruntime": "onnxruntime", "onnxruntime-int8": {"kind": "onnxruntime", "network": "int8"},
        "openvino": "openvino", "openvino-bf16": {"kind": "openvino", "precision": "bf16"},
        "openvino-int8": {"kind": "openvino", "precision": "int8"},
        "tensorrt": {"kind": "tensorrt", "cuda_graphs": [batch]},
        PREVIOUS: "onnxruntime",  # its settings carry threads and batch; the backend is bench's own
    }


def runtime_for(name: str, batch: int, threads: int) -> RuntimeSettings:
    """The runtime settings a bench backend name stands for (no fallback: a bench measures one)."""
    backends = _backends(batch)
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
    round: int = 1
    load_average: float = 0.0                    # 1-minute load average when the row finished
    notes: list[str] = field(default_factory=list)


def command(args: argparse.Namespace, cfg: Any) -> int:
    backends = tuple(b.strip() for b in args.backend.split(",") if b.strip())
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise ValueError(f"--batch must be a comma list of integers, got {args.batch!r}") from None
    if min(batches) < 1 or args.iterations < 1:
        raise ValueError("--batch sizes and --iterations must be at least 1")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    for name in backends:
        runtime_for(name, 1, 0)  # an unknown name is refused before any work
    runtime_for(args.reference, 1, 0)
    report = run_bench(load_bundle(args.model), backends, batches, args.iterations, args.warmup,
                       cfg.runtime.threads, args.data, progress=sys.stderr.isatty(), rounds=args.rounds,
                       reference=args.reference)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def run_bench(bundle: Bundle, backends: tuple[str, ...], batches: tuple[int, ...], iterations: int = 20,
              warmup: int = 2, threads: int = 0, data: Path | None = None, progress: bool = False,
              rounds: int = 1, reference: str = REFERENCE) -> dict[str, Any]:
    frames = encoded_frames(bundle, data, max(batches))
    results: list[BenchResult] = []
    skipped: dict[str, str] = {}
    for rnd in range(1, rounds + 1):
        for name in (b for b in backends if b not in skipped):
            for batch in batches:
                reset_peak_rss()
                runtime = runtime_for(name, batch, threads)
                try:
                    backend = start_backend(bundle, name, runtime)
                except BackendError as e:
                    skipped[name] = str(e)
                    break
                pipeline = Pipeline(bundle, backend, runtime, use_mask=False)
                result = bench_one(pipeline, name, frames, batch, iterations, warmup, progress)
                result.round, result.load_average = rnd, round(os.getloadavg()[0], 2)
                results.append(result)
                del pipeline, backend
    return {"model_id": bundle.manifest.model_id, "method": bundle.manifest.method,
            "input_hw": list(bundle.manifest.input_hw), "tiled": bundle.manifest.model.tiling.enabled,
            "threads": threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "data": str(data) if data else "synthetic", "reference": reference,
            "results": [asdict(r) for r in results], "skipped": skipped,
            "ratio_to_reference": ratios(results, reference),
            "stage_ratio_to_reference": stage_ratios(results, reference)}


def start_backend(bundle: Bundle, name: str, runtime: RuntimeSettings) -> Backend:
    if name == PREVIOUS:
        return PreviousPath(bundle, runtime.threads)
    return open_backend(bundle, runtime)[0]


def bench_one(pipeline: Pipeline, name: str, frames: list[bytes], batch: int, iterations: int, warmup: int,
              progress: bool) -> BenchResult:
    cuda = pipeline.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(pipeline.device)
    latencies, stages = [], {s: 0.0 for s in STAGES}
    split = getattr(pipeline.backend, "stages_ms", None)  # the previous path's network/head/postprocess
    for it in tqdm(range(warmup + iterations), desc=f"{name} b{batch}", disable=not progress, leave=False):
        chunk = [frames[(it * batch + i) % len(frames)] for i in range(batch)]
        t0 = time.perf_counter()
        images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in chunk]
        decode_ms = (time.perf_counter() - t0) * 1000.0
        scored = pipeline.score(images)
        if it < warmup:
            if split is not None:
                split.update(dict.fromkeys(split, 0.0))
            continue
        latencies.append((time.perf_counter() - t0) * 1000.0)
        stages["decode"] += decode_ms / iterations
        for stage, ms in scored[0].timings_ms.items():  # per frame; a call's stage time is batch x that
            stages[stage] = stages.get(stage, 0.0) + ms * batch / iterations
    if split is not None:
        stages.update({s: ms / iterations for s, ms in split.items()})
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


def ratios(results: list[BenchResult], reference: str = REFERENCE) -> dict[str, dict[str, list[float]]]:
    """images/s of each backend over the reference's, per batch size: one ratio per round, each
    against the reference's row of the same round."""
    ref = {(r.round, r.batch): r.images_per_s for r in results if r.backend == reference}
    out: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if r.backend != reference and (r.round, r.batch) in ref:
            out.setdefault(r.backend, {}).setdefault(str(r.batch), []).append(
                round(r.images_per_s / ref[(r.round, r.batch)], 3))
    return out


def stage_ratios(results: list[BenchResult], reference: str = REFERENCE) -> dict[str, dict[str, dict[str, float]]]:
    """Per stage, the reference's time over the backend's (above 1: the backend is faster there), per
    batch size, from the round-summed times."""
    totals: dict[tuple[str, int], dict[str, float]] = {}
    for r in results:
        acc = totals.setdefault((r.backend, r.batch), {})
        for stage, ms in r.stages_ms.items():
            acc[stage] = acc.get(stage, 0.0) + ms
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, batch), stages in totals.items():
        ref = totals.get((reference, batch))
        if name == reference or ref is None:
            continue
        out.setdefault(name, {})[str(batch)] = {
            s: round(ref[s] / ms, 2) for s, ms in stages.items() if ms > 0.001 and ref.get(s, 0.0) > 0.001}
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
    lines = [f"{report['model_id']} {report['input_hw']} on {report['device']} ({report['threads']} threads)",
             f"{'backend':<22}{'round':>6}{'batch':>6}{'img/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'rss MB':>9}"
             f"{'load':>7}  " + " ".join(f"{s:>9}" for s in STAGES)]
    for r in report["results"]:
        lines.append(f"{r['backend']:<22}{r['round']:>6}{r['batch']:>6}{r['images_per_s']:>9.2f}"
                     f"{r['latency_ms']['p50']:>10.1f}{r['latency_ms']['p99']:>10.1f}{r['peak_host_rss_mb']:>9.0f}"
                     f"{r['load_average']:>7.2f}  " + " ".join(f"{r['stages_ms'].get(s, 0.0):>9.2f}" for s in STAGES)
                     + "".join(f"  {s} {r['stages_ms'][s]:.2f}" for s in PREVIOUS_STAGES if s in r["stages_ms"]))
    for name, why in report["skipped"].items():
        lines.append(f"{name}: skipped ({why})")
    for name, per in report["ratio_to_reference"].items():
        lines.append(f"{name} vs {report['reference']}: " + ", ".join(
            f"batch {b}: " + "/".join(f"x{v}" for v in vs) for b, vs in per.items()))
    for name, per in report["stage_ratio_to_reference"].items():
        for b, stages in per.items():
            lines.append(f"{name} vs {report['reference']}, batch {b}, per stage: "
                         + ", ".join(f"{s} x{v}" for s, v in stages.items()))
    return "\n".join(lines)
