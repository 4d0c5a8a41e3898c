"""The benchmark command: every stage timed, images/s and latency per batch size, rounds
interleaved with the load average per row, ratios to the previous path from the same round. No
speed is asserted (measured, never tested)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engines.bench import PREVIOUS_STAGES, STAGES, BenchResult, ratios, stage_ratios

REPO = Path(__file__).resolve().parents[1]


def _result(backend: str, batch: int, ips: float, rnd: int = 1, stages: dict | None = None) -> BenchResult:
    return BenchResult(backend, batch, ips, {"p50": 1.0, "p99": 1.0, "mean": 1.0}, stages or {}, 1.0, None, 1,
                       round=rnd)


def test_ratios_are_to_the_reference_of_the_same_round_and_batch() -> None:
    ref = "onnxruntime-previous"
    results = [_result(ref, 1, 2.0), _result(ref, 8, 4.0), _result("openvino", 1, 5.0), _result("openvino", 8, 6.0),
               _result(ref, 1, 4.0, rnd=2), _result("openvino", 1, 6.0, rnd=2), _result("openvino-int8", 16, 9.0)]
    assert ratios(results, ref) == {"openvino": {"1": [2.5, 1.5], "8": [1.5]}}
    staged = [_result(ref, 1, 1.0, stages={"score": 9.0, "decode": 1.0, "mask": 0.0}),
              _result("openvino", 1, 1.0, stages={"score": 3.0, "decode": 1.0, "mask": 0.0})]
    assert stage_ratios(staged, ref) == {"openvino": {"1": {"score": 3.0, "decode": 1.0}}}


def test_bench_json_reports_every_stage_and_round(padim_bundle) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "bench", "--model", str(padim_bundle.path), "--backend",
                        "onnxruntime-previous,openvino,tensorrt", "--batch", "1,2", "--iterations", "2",
                        "--warmup", "0", "--rounds", "2", "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [(x["backend"], x["batch"], x["round"]) for x in report["results"]] == [
        (b, n, rnd) for rnd in (1, 2) for b in ("onnxruntime-previous", "openvino") for n in (1, 2)]
    for x in report["results"]:
        expected = set(STAGES) | (set(PREVIOUS_STAGES) if x["backend"] == "onnxruntime-previous" else set())
        assert set(x["stages_ms"]) == expected and all(v >= 0 for v in x["stages_ms"].values())
        assert x["stages_ms"]["score"] > 0 and x["images_per_s"] > 0 and x["peak_host_rss_mb"] > 0
        assert x["latency_ms"]["p50"] <= x["latency_ms"]["p99"] and x["load_average"] >= 0
    previous = [x for x in report["results"] if x["backend"] == "onnxruntime-previous"]
    # The previous path's score stage is its network, head and postprocess.
    assert all(sum(x["stages_ms"][s] for s in PREVIOUS_STAGES) <= x["stages_ms"]["score"] * 1.05 for x in previous)
    assert {b: len(v) for b, v in report["ratio_to_reference"]["openvino"].items()} == {"1": 2, "2": 2}
    assert "score" in report["stage_ratio_to_reference"]["openvino"]["1"]
    assert "tensorrt" in report["skipped"]["tensorrt"]


def test_bench_refuses_an_unknown_backend(padim_bundle) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "bench", "--model", str(padim_bundle.path), "--backend",
                        "torch,openvino-fp8"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown 'openvino-fp8'" in r.stderr
