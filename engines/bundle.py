"""The model bundle: a directory that holds a calibrated model as data.

    manifest.json        what the model is (method, network, input, head, thresholds, ...)
    network.safetensors  the engine's weights (torch reference runtime)
    head.safetensors     the head's statistics (means, inverse covariances, memory bank, ...)
    model.onnx           the engine exported with a dynamic batch axis
    mask/                reference images and masks for the object mask (optional)
    plans/               compiled TensorRT plans, each with its own manifest (optional)

Nothing in a bundle is executable: tensors are safetensors, the manifest is JSON. Every
file is listed in the manifest with its SHA-256, and loading refuses a bundle whose files do
not match, naming the file and both hashes.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "inspection-bundle/1"
MANIFEST, NETWORK, HEAD, ONNX = "manifest.json", "network.safetensors", "head.safetensors", "model.onnx"


class BundleError(ValueError):
    pass


@dataclass
class Manifest:
    method: str
    network: dict[str, Any]          # kind and architecture: backbone, taps, pool, ...
    input: dict[str, Any]            # size [h, w], mean, std (RGB, 0..255 scale)
    head: dict[str, Any]             # method parameters the head needs
    postprocess: dict[str, Any]      # blur_sigma
    tiling: dict[str, Any]
    mask: dict[str, Any] = field(default_factory=dict)        # object mask (agent/masks.py); {} = none
    threshold: dict[str, Any] = field(default_factory=dict)   # value, policy, expected rates
    normalizer: dict[str, Any] = field(default_factory=dict)  # center, threshold
    score_stats: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)       # file name -> sha256
    versions: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    model_id: str = ""
    format: str = FORMAT

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.input["size"][0]), int(self.input["size"][1])


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    def network_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / NETWORK))

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / HEAD))

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "numpy": numpy.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "agent": "0.1.0"}


def write_tensors(path: Path, network: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in network.items()}, str(path / NETWORK))
    save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / HEAD))


def write_manifest(path: Path, manifest: Manifest) -> Bundle:
    """Hash every payload file, derive the model id from the hashes and write the manifest."""
    # Every payload file is covered (mask references included); plans carry their own manifest.
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.name != MANIFEST and p.relative_to(path).parts[0] != "plans")
    manifest.files = {name: sha256(path / name) for name in files}
    manifest.versions = versions()
    manifest.created = manifest.created or time.time()
    # The id covers everything that changes scores: payload hashes and the decision settings.
    ident = json.dumps([manifest.files, manifest.threshold, manifest.normalizer, manifest.tiling, manifest.mask],
                       sort_keys=True)
    manifest.model_id = f"{manifest.method}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    (path / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
    return Bundle(path, manifest)


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST})")
    try:
        data = json.loads(mpath.read_text())
        manifest = Manifest(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest: {e}") from None
    if manifest.format != FORMAT:
        raise BundleError(f"{mpath}: bundle format {manifest.format!r}, this agent reads {FORMAT!r}")
    for name, expected in manifest.files.items() if verify else ():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{path}: bundle file {name} is missing (model {manifest.model_id})")
        actual = sha256(f)
        if actual != expected:
            raise BundleError(f"{f}: content hash mismatch (manifest sha256 {expected[:16]}..., file {actual[:16]}...); "
                              f"refusing model {manifest.model_id}: the bundle was altered or damaged")
    return Bundle(path, manifest)
