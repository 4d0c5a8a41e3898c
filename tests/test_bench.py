"""The benchmark command: every stage timed, images/s and latency per batch size, the ratio to
the torch eager CPU path from the same run. No speed is asserted (measured, never tested)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engines.bench import STAGES, BenchResult, ratios

REPO = Path(__file__).resolve().parents[1]


def _result(backend: str, batch: int, ips: float) -> BenchResult:
    return BenchResult(backend, batch, ips, {"p50": 1.0, "p99": 1.0, "mean": 1.0}, {}, 1.0, None, 1)


def test_ratio_is_to_torch_eager_cpu_per_batch() -> None:
    results = [_result("torch", 1, 2.0), _result("torch", 8, 4.0), _result("onnxruntime", 1, 5.0),
               _result("onnxruntime", 8, 6.0), _result("onnxruntime-int8", 16, 9.0)]
    assert ratios(results) == {"onnxruntime": {"1": 2.5, "8": 1.5}}


def test_bench_json_reports_every_stage(padim_bundle) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "bench", "--model", str(padim_bundle.path), "--backend",
                        "torch,onnxruntime,tensorrt", "--batch", "1,2", "--iterations", "2", "--warmup", "0",
                        "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [(x["backend"], x["batch"]) for x in report["results"]] == [
        ("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    for x in report["results"]:
        assert set(x["stages_ms"]) == set(STAGES) and all(v >= 0 for v in x["stages_ms"].values())
        assert x["stages_ms"]["network"] > 0 and x["images_per_s"] > 0 and x["peak_host_rss_mb"] > 0
        assert x["latency_ms"]["p50"] <= x["latency_ms"]["p99"]
    assert set(report["ratio_to_torch_cpu"]["onnxruntime"]) == {"1", "2"}
    if "tensorrt" in report["skipped"]:
        assert "tensorrt" in report["skipped"]["tensorrt"]


def test_bench_refuses_an_unknown_backend(padim_bundle) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "bench", "--model", str(padim_bundle.path), "--backend",
                        "torch,openvino"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown 'openvino'" in r.stderr
