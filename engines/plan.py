"""Compiled TensorRT plans and their manifests: what a plan was built for, and the check that
refuses a plan on a GPU or TensorRT version it was not built for.

Plans live in ``BUNDLE/plans/<name>.plan`` with ``BUNDLE/plans/<name>.json`` beside each. A
TensorRT plan is only valid for the exact TensorRT version and GPU model it was built with,
and for the ONNX it was built from; a mismatch is refused before deserialising anything.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.bundle import Bundle, sha256

PLANS = "plans"
PRECISIONS = ("fp32", "fp16", "int8")


class PlanMismatch(ValueError):
    """A plan was built for another GPU, TensorRT version or network; the message names what differs."""


@dataclass
class PlanManifest:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str          # "8.6"
    precision: str                   # fp32 | fp16 | int8
    input_name: str
    input_hw: list[int]              # [H, W]
    profile: dict[str, list[int]]    # batch sizes: {"min": [1], "opt": [n], "max": [n]} per the profile
    output_names: list[str]
    onnx_sha256: str
    statistics: dict[str, list[int]] = field(default_factory=dict)  # head statistic inputs: fixed shapes
    plan_sha256: str = ""
    created: float = field(default_factory=time.time)
    build_s: float = 0.0

    @property
    def max_batch(self) -> int:
        return int(self.profile["max"][0])

    def shapes(self) -> dict[str, tuple[int, int, int, int]]:
        """Input shapes of the optimisation profile: min, opt, max, each (B, H, W, 3) uint8."""
        h, w = self.input_hw
        return {k: (int(v[0]), h, w, 3) for k, v in self.profile.items()}


def batch_profile(max_batch: int, opt_batch: int | None = None) -> dict[str, list[int]]:
    """Batch sizes for an optimisation profile that serves every batch from 1 to ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"--batch must be at least 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"optimal batch {opt} is outside the profile 1..{max_batch}")
    return {"min": [1], "opt": [opt], "max": [max_batch]}


def plan_name(precision: str, max_batch: int, cc: str) -> str:
    return f"{precision}-b{max_batch}-sm{cc.replace('.', '')}"


def plan_paths(bundle_path: Path, name: str) -> tuple[Path, Path]:
    d = Path(bundle_path) / PLANS
    return d / f"{name}.plan", d / f"{name}.json"


def write_plan_manifest(path: Path, manifest: PlanManifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))


def read_plan_manifest(path: Path) -> PlanManifest:
    try:
        return PlanManifest(**json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise PlanMismatch(f"{path}: unreadable plan manifest: {e}") from None


def statistic_shapes(bundle: Bundle, names: list[str] | None = None) -> dict[str, list[int]]:
    """Shapes of the head statistics (all, or ``names``): a plan's profile fixes them."""
    tensors = bundle.head_tensors()
    return {n: list(tensors[n].shape) for n in (names if names is not None else tensors)}


def check_plan(manifest: PlanManifest, trt_version: str, gpu_name: str, cc: str, onnx_sha: str,
               stat_shapes: dict[str, list[int]] | None = None) -> None:
    """Raise PlanMismatch naming every field where the plan differs from this machine and bundle."""
    wanted = {"TensorRT version": (manifest.tensorrt_version, trt_version),
              "GPU name": (manifest.gpu_name, gpu_name),
              "compute capability": (manifest.compute_capability, cc),
              "ONNX sha256": (manifest.onnx_sha256, onnx_sha)}
    if stat_shapes is not None:
        # A recalibration that keeps the network keeps the plan, unless a statistic changed size
        # (a kNN bank of another length): the profile fixes their shapes.
        here = {n: stat_shapes.get(n) for n in manifest.statistics}
        wanted["head statistic shapes"] = (manifest.statistics, here)
    diffs = [f"{what}: plan {built!r}, here {here!r}" for what, (built, here) in wanted.items() if built != here]
    if diffs:
        raise PlanMismatch("TensorRT plan does not match: " + "; ".join(diffs) + " (rebuild with build-engine)")


def find_plan(bundle: Bundle, trt_version: str, gpu_name: str, cc: str,
              precision: str | None = None) -> tuple[Path, PlanManifest]:
    """The newest plan in the bundle that matches this machine (and precision, if given).

    Raises PlanMismatch listing why each plan was refused, or FileNotFoundError when there are none.
    """
    manifests = sorted((Path(bundle.path) / PLANS).glob("*.json"))
    if not manifests:
        raise FileNotFoundError(f"{bundle.path / PLANS}: no TensorRT plans (build one with build-engine)")
    onnx_sha = bundle.manifest.files.get(bundle.onnx_path.name) or sha256(bundle.onnx_path)
    stat_shapes = statistic_shapes(bundle)
    refused, matches = [], []
    for mpath in manifests:
        try:
            m = read_plan_manifest(mpath)
            if precision is not None and m.precision != precision:
                raise PlanMismatch(f"precision {m.precision}, wanted {precision}")
            check_plan(m, trt_version, gpu_name, cc, onnx_sha, stat_shapes)
        except PlanMismatch as e:
            refused.append(f"{mpath.name}: {e}")
            continue
        plan = mpath.with_suffix(".plan")
        if not plan.is_file():
            refused.append(f"{mpath.name}: {plan.name} is missing")
        elif m.plan_sha256 and sha256(plan) != m.plan_sha256:
            refused.append(f"{mpath.name}: {plan.name} content hash mismatch")
        else:
            matches.append((m.created, plan, m))
    if not matches:
        raise PlanMismatch(f"{bundle.path / PLANS}: no plan fits this machine: " + " | ".join(refused))
    _, plan, m = max(matches, key=lambda t: t[0])
    return plan, m
