"""benchmark scoring: images/s, p50/p99 latency per batch size, per-stage times, peak memory

Each backend scores the same encoded images through the whole frame path, stage by stage:

    decode       JPEG/PNG bytes -> image (OpenCV)
    preprocess   resize to the model size (host)
    upload       host batch -> device, uint8 (pinned buffers and a copy stream on CUDA), normalise
    network      the engine (backend.run)
    head         the method's head (Mahalanobis, kNN, ...) on the device
    postprocess  upsample and blur the map on the device
    stitch       download and resize (or stitch tiles) back to the frame size

A batch's latency is the wall time of all stages for its frames; CUDA is synchronised at
each stage boundary so the stages are honest (which costs the overlap a real pipeline gets).
With several backends in one run, ``ratio_to_torch_cpu`` divides each backend's images/s by
that of the plain torch eager CPU path (backend ``torch``) measured in the same run.

Backends: torch (eager CPU, the reference), onnxruntime, onnxruntime-int8 (after
``python -m engines.quantize``), torch-cuda, torch-cuda-fp16 (half weights, channels-last,
CUDA graphs per batch size), tensorrt (a plan from build-engine).
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
from engines.runtimes.base import Backend, BackendError
from engines.scorer import Scorer

STAGES = ("decode", "preprocess", "upload", "network", "head", "postprocess", "stitch")
REFERENCE = "torch"
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "torch-cuda", "torch-cuda-fp16", "tensorrt")
HEADS = ("bundle", "inverse", "cholesky", "cholesky-fp16")


@dataclass
class BenchConfig:
    backends: tuple[str, ...] = ("torch", "onnxruntime")
    batches: tuple[int, ...] = (1, 8)
    iterations: int = 20
    warmup: int = 2
    threads: int = 0                 # 0 = torch's / ONNX Runtime's default (one per core)
    head: str = "bundle"             # Mahalanobis variant: as the bundle says, or override
    data: Path | None = None         # images to score; None = synthetic frames


@dataclass
class BenchResult:
    backend: str
    batch: int
    images_per_s: float
    latency_ms: dict[str, float]                 # p50, p99, mean per batch
    stages_ms: dict[str, float]                  # mean per batch
    peak_host_rss_mb: float
    peak_device_mb: float | None
    iterations: int
    notes: list[str] = field(default_factory=list)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="the bundle directory")
    p.add_argument("--backend", default="torch,onnxruntime", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    p.add_argument("--iterations", type=int, default=20, help="timed batches per backend and batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--head", choices=HEADS, default="bundle", help="Mahalanobis variant (PaDiM bundles)")
    p.add_argument("--data", type=Path, default=None, help="a folder of images (searched recursively)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def command(args: argparse.Namespace, cfg: Any) -> int:
    backends = tuple(b.strip() for b in args.backend.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"--backend: unknown {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise ValueError(f"--batch must be a comma list of integers, got {args.batch!r}") from None
    if min(batches) < 1 or args.iterations < 1:
        raise ValueError("--batch sizes and --iterations must be at least 1")
    bc = BenchConfig(backends, batches, args.iterations, args.warmup, cfg.runtime.threads, args.head, args.data)
    report = run_bench(load_bundle(args.model), bc, progress=sys.stderr.isatty())
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def run_bench(bundle: Bundle, bc: BenchConfig, progress: bool = False) -> dict[str, Any]:
    if bc.threads:
        torch.set_num_threads(bc.threads)
    frames = encoded_frames(bundle, bc.data, max(bc.batches))
    results: list[BenchResult] = []
    skipped: dict[str, str] = {}
    for name in bc.backends:
        reset_peak_rss()
        try:
            backend = open_named(bundle, name, bc.threads, bc.batches)
        except BackendError as e:
            skipped[name] = str(e)
            continue
        scorer = Scorer(bundle, backend, batch_size=max(bc.batches), use_mask=False)
        scorer.head = head_variant(bundle, bc.head, scorer.device) or scorer.head
        for batch in bc.batches:
            results.append(bench_one(scorer, frames, batch, bc, progress))
        del scorer, backend
    return {"model_id": bundle.manifest.model_id, "method": bundle.manifest.method,
            "input_hw": list(bundle.manifest.input_hw), "tiled": bool(bundle.manifest.tiling.get("enabled")),
            "head": bc.head, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "data": str(bc.data) if bc.data else "synthetic",
            "results": [asdict(r) for r in results], "skipped": skipped,
            "ratio_to_torch_cpu": ratios(results)}


def open_named(bundle: Bundle, name: str, threads: int, batches: tuple[int, ...]) -> Backend:
    """The backends by bench name; each raises BackendError where it cannot run here."""
    from engines.runtimes.onnxruntime_backend import OrtBackend, OrtBackendConfig
    from engines.runtimes.torch_backend import TorchBackend, TorchBackendConfig

    if name == "torch":
        return TorchBackend(bundle, TorchBackendConfig("cpu"))
    if name in ("onnxruntime", "onnxruntime-int8"):
        model = "model.onnx" if name == "onnxruntime" else "model.int8.onnx"
        return OrtBackend(bundle, OrtBackendConfig(threads=threads, model=model))
    if name == "torch-cuda":
        return TorchBackend(bundle, TorchBackendConfig("cuda", channels_last=True))
    if name == "torch-cuda-fp16":
        if not torch.cuda.is_available():
            raise BackendError("torch sees no CUDA device")
        return TorchBackend(bundle, TorchBackendConfig("cuda", half=True, channels_last=True, cuda_graphs=batches))
    from engines.runtimes.tensorrt_backend import TensorRTBackend, TensorRTBackendConfig

    return TensorRTBackend(bundle, TensorRTBackendConfig("cuda", cuda_graphs=batches))


def head_variant(bundle: Bundle, head: str, device: torch.device) -> torch.nn.Module | None:
    """A PaDiM head with another Mahalanobis variant, or None to keep the bundle's own head."""
    if head == "bundle":
        return None
    if bundle.manifest.method != "padim":
        raise ValueError(f"--head {head} applies to PaDiM bundles, this one is {bundle.manifest.method}")
    from engines.heads import build_head

    params = dict(bundle.manifest.head, factor="inverse" if head == "inverse" else "cholesky",
                  half=head == "cholesky-fp16")
    return build_head("padim", params, bundle.head_tensors()).to(device)


def bench_one(scorer: Scorer, frames: list[bytes], batch: int, bc: BenchConfig, progress: bool) -> BenchResult:
    from engines.runtimes.torch_backend import Uploader

    uploader = Uploader(scorer.device, batch, scorer.input_hw)
    if scorer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(scorer.device)
    latencies, stages = [], {s: 0.0 for s in STAGES}
    total = bc.warmup + bc.iterations
    for it in tqdm(range(total), desc=f"{scorer.backend.name} b{batch}", disable=not progress, leave=False):
        chunk = [frames[(it * batch + i) % len(frames)] for i in range(batch)]
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        score_batch(scorer, uploader, chunk, timings)
        if it >= bc.warmup:
            latencies.append((time.perf_counter() - t0) * 1000.0)
            for s in STAGES:
                stages[s] += timings.get(s, 0.0) / bc.iterations
    lat = np.array(latencies)
    peak_dev = (torch.cuda.max_memory_allocated(scorer.device) / 2**20) if scorer.device.type == "cuda" else None
    return BenchResult(scorer.backend.name, batch, float(1000.0 * batch / lat.mean()),
                       {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                        "mean": float(lat.mean())},
                       {s: round(v, 3) for s, v in stages.items()}, peak_rss_mb(), peak_dev, bc.iterations,
                       ["p99 of fewer than 100 batches is close to the maximum"] if bc.iterations < 100 else [])


@torch.inference_mode()
def score_batch(scorer: Scorer, uploader: Any, encoded: list[bytes], timings: dict[str, float]) -> list[np.ndarray]:
    """One batch of frames through every stage; adds each stage's wall time (ms) to ``timings``."""
    clock = _Clock(scorer.device, timings)
    images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in encoded]
    clock.lap("decode")
    if scorer.tiling.enabled:  # tiles: the scorer's own tiled path, its stages mapped onto ours
        inner: dict[str, float] = {}
        for fs in scorer.score_frames(images):
            for k, v in fs.timings_ms.items():
                inner[k] = inner.get(k, 0.0) + v
        for k, v in inner.items():
            stage = {"preprocess": "upload", "download": "stitch"}.get(k, k)
            timings[stage] = timings.get(stage, 0.0) + v
        clock.t = time.perf_counter()
        return []
    h, w = scorer.input_hw
    resized = np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in images])
    clock.lap("preprocess")
    x = uploader.put(resized).permute(0, 3, 1, 2).flip(1).float()
    x = (x - scorer.mean) / scorer.std
    clock.lap("upload")
    maps, _ = scorer.maps(x, timings)  # network, head, postprocess
    clock.t = time.perf_counter()
    maps = maps.cpu().numpy()
    out = [cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR) for img, m in zip(images, maps)]
    clock.lap("stitch")
    return out


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
    lines = [f"{report['model_id']} {report['input_hw']} on {report['device']} ({report['threads']} threads)",
             f"{'backend':<18}{'batch':>6}{'img/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'rss MB':>9}  "
             + " ".join(f"{s:>11}" for s in STAGES)]
    for r in report["results"]:
        lines.append(f"{r['backend']:<18}{r['batch']:>6}{r['images_per_s']:>9.2f}{r['latency_ms']['p50']:>10.1f}"
                     f"{r['latency_ms']['p99']:>10.1f}{r['peak_host_rss_mb']:>9.0f}  "
                     + " ".join(f"{r['stages_ms'][s]:>11.2f}" for s in STAGES))
    for name, why in report["skipped"].items():
        lines.append(f"{name}: skipped ({why})")
    for name, per in report["ratio_to_torch_cpu"].items():
        lines.append(f"{name} vs torch eager CPU: " + ", ".join(f"batch {b}: x{v}" for b, v in per.items()))
    return "\n".join(lines)


class _Clock:
    def __init__(self, device: torch.device, timings: dict[str, float]) -> None:
        self.timings, self.cuda = timings, device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.t) * 1000.0
        self.t = now
