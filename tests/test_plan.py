"""Plan manifests: a TensorRT plan is refused on another GPU, TensorRT version or network; the
TensorRT backend refuses to start without TensorRT and open_backend falls back."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from engines.bundle import Bundle, Manifest
from engines.plan import (PlanManifest, PlanMismatch, batch_profile, check_plan, find_plan, plan_paths,
                          read_plan_manifest, write_plan_manifest)
from engines.runtimes import RuntimeSettings, open_backend
from engines.runtimes.base import BackendError
from engines.runtimes.tensorrt_backend import TensorRTBackend, TensorRTSettings, profile_batch_ok

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HERE = {"trt_version": "10.3.0", "gpu_name": "NVIDIA A2", "cc": "8.6", "onnx_sha": "ab" * 32}


def plan_manifest(**changes: object) -> PlanManifest:
    m = PlanManifest(tensorrt_version="10.3.0", gpu_name="NVIDIA A2", compute_capability="8.6", precision="fp16",
                     input_name="input", input_hw=[128, 128], profile=batch_profile(8),
                     output_names=["map", "score"], onnx_sha256="ab" * 32, statistics={"mean": [4, 8]})
    return dataclasses.replace(m, **changes)


def test_matching_plan_is_accepted() -> None:
    check_plan(plan_manifest(), **HERE)


@pytest.mark.parametrize("field,value,named", [
    ("gpu_name", "NVIDIA GeForce RTX 4090", "GPU name"),
    ("compute_capability", "8.9", "compute capability"),
    ("tensorrt_version", "10.0.1", "TensorRT version"),
    ("onnx_sha256", "cd" * 32, "ONNX sha256"),
])
def test_each_mismatch_is_refused_and_named(field: str, value: str, named: str) -> None:
    with pytest.raises(PlanMismatch, match=named) as e:
        check_plan(plan_manifest(**{field: value}), **HERE)
    assert "rebuild with build-engine" in str(e.value)
    others = {"GPU name", "compute capability", "TensorRT version", "ONNX sha256"} - {named}
    assert not any(o in str(e.value) for o in others)  # only what differs is named


def test_a_statistic_of_another_size_needs_a_rebuild() -> None:
    """The plan binds the head statistics as inputs of fixed shape: new values keep it, a new size not."""
    check_plan(plan_manifest(), **HERE, stat_shapes={"mean": [4, 8], "inv_cov": [4, 8, 8]})
    with pytest.raises(PlanMismatch, match=r"head statistic shapes: plan \{'mean': \[4, 8\]\}, here "
                                           r"\{'mean': \[5, 8\]\}"):
        check_plan(plan_manifest(), **HERE, stat_shapes={"mean": [5, 8]})


def test_profile_covers_batch_one_to_n() -> None:
    m = plan_manifest()
    assert m.shapes() == {"min": (1, 128, 128, 3), "opt": (8, 128, 128, 3), "max": (8, 128, 128, 3)}
    profile_batch_ok(m, 1)
    profile_batch_ok(m, 8)
    with pytest.raises(ValueError, match="outside the TensorRT plan's profile 1..8"):
        profile_batch_ok(m, 9)
    with pytest.raises(ValueError, match="at least 1"):
        batch_profile(0)


def _bundle(tmp_path: Path) -> Bundle:
    import torch
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.onnx").write_bytes(b"not really onnx")
    save_file({"mean": torch.zeros(4, 8)}, str(tmp_path / "head.safetensors"))
    from engines.decision import Decision
    from engines.model import ModelSpec

    decision = Decision(image_threshold=2.0, pixel_threshold=1.0, center=1.0, policy="quantile",
                        false_reject_rate=0.0, pixel_quantile=0.999)
    m = Manifest(model=ModelSpec(input_size=[128, 128]), frame_size=[128, 128], decision=decision,
                 files={"model.onnx": "ab" * 32})
    return Bundle(tmp_path, m)


def _write_plan(bundle: Bundle, name: str, manifest: PlanManifest) -> Path:
    plan, mpath = plan_paths(bundle.path, name)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"FakePlanBytes" + name.encode())
    write_plan_manifest(mpath, manifest)
    return plan


def test_find_plan_picks_the_one_for_this_gpu(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    _write_plan(bundle, "other", plan_manifest(gpu_name="Orin", compute_capability="8.7", created=2.0))
    mine = _write_plan(bundle, "mine", plan_manifest(created=1.0))
    path, m = find_plan(bundle, "10.3.0", "NVIDIA A2", "8.6")
    assert path == mine and m.gpu_name == "NVIDIA A2"
    assert read_plan_manifest(plan_paths(bundle.path, "mine")[1]) == m
    with pytest.raises(PlanMismatch, match="precision fp16, wanted int8"):
        find_plan(bundle, "10.3.0", "NVIDIA A2", "8.6", precision="int8")


def test_find_plan_explains_every_refusal(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    _write_plan(bundle, "orin", plan_manifest(gpu_name="Orin", compute_capability="8.7"))
    with pytest.raises(PlanMismatch, match=r"orin.json: .*GPU name: plan 'Orin', here 'NVIDIA A2'"):
        find_plan(bundle, "10.3.0", "NVIDIA A2", "8.6")
    with pytest.raises(FileNotFoundError, match="no TensorRT plans"):
        find_plan(_bundle(tmp_path / "empty"), "10.3.0", "NVIDIA A2", "8.6")


def test_altered_plan_file_is_refused(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    plan = _write_plan(bundle, "mine", plan_manifest(plan_sha256="00" * 32))
    with pytest.raises(PlanMismatch, match=f"{plan.name} content hash mismatch"):
        find_plan(bundle, "10.3.0", "NVIDIA A2", "8.6")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; this covers the machine without it")
def test_tensorrt_backend_without_tensorrt_falls_back(padim_bundle) -> None:
    with pytest.raises(BackendError, match="tensorrt Python module is not installed"):
        TensorRTBackend(padim_bundle, TensorRTSettings())
    backend, why = open_backend(padim_bundle, RuntimeSettings(backend="tensorrt"))
    assert backend.name == "onnxruntime" and "tensorrt: the tensorrt Python module is not installed" in why
    with pytest.raises(BackendError, match="no backend could start"):
        open_backend(padim_bundle, RuntimeSettings(backend="tensorrt", fallback=False))
