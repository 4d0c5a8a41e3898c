"""The model bundle: a directory that holds a calibrated model as data.

    manifest.json        what the model is: the model spec (method and its settings, backbone,
                         taps, input, tiling, mask), the decision (thresholds), hashes, versions
    network.safetensors  the engine's weights (torch reference runtime)
    head.safetensors     the head's statistics (means, inverse covariances, memory bank, ...)
    model.onnx           the engine exported with a dynamic batch axis
    mask/                reference images and masks for the object mask (optional)
    plans/               compiled TensorRT plans, each with its own manifest (optional)

Nothing in a bundle is executable: tensors are safetensors, the manifest is JSON, and ONNX
networks must hold their weights inside the file (external data is refused). The bundle is
sealed; loading refuses it, in one line naming the bundle and what is wrong, where:

- the manifest does not validate against its typed sections (a missing or wrongly typed key,
  an implausible input size, a non-finite threshold, ...) or has an older format;
- a file name in the manifest could reach outside the bundle (absolute, ``..``, backslash,
  symbolic link) or a mask reference file is not among the hashed files;
- the model id, a SHA-256 of the whole manifest, does not match it (the manifest was edited);
- a file's SHA-256 differs from the manifest's (both hashes are named).

Loading reads only the manifest and the files it hashes, and imports no torch: a service
can refuse a bad bundle before it pays for torch.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Iterator, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator

from engines.decision import Decision, Finite
from engines.model import ModelSpec
from engines.settings import Settings, describe

if TYPE_CHECKING:
    import torch
    from onnx import GraphProto, NodeProto, TensorProto

__all__ = ["FORMAT", "HEAD", "MANIFEST", "NETWORK", "ONNX", "Bundle", "BundleError", "Manifest", "load_bundle",
           "model_id", "sha256", "versions", "write_manifest", "write_tensors"]

FORMAT = "inspection-bundle/4"
# Format 1 ids covered only hashes and decision settings; format 2 kept method settings as untyped
# dicts and normalised outside the engine; format 3's model.onnx was the network alone, where
# format 4's is the whole score graph. Such bundles must be recalibrated.
OLDER_FORMATS = ("inspection-bundle/1", "inspection-bundle/2", "inspection-bundle/3")
MANIFEST, NETWORK, HEAD, ONNX = "manifest.json", "network.safetensors", "head.safetensors", "model.onnx"


class BundleError(ValueError):
    pass


def _sha256_hex(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("expected a SHA-256: 64 lowercase hex characters")
    return value


Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


class MaskReference(Settings):
    image: str = Field(description="reference image, a bundle file")
    object: str = Field(description="the part on that image, a bundle file")
    source: str = Field(description="the good image it was taken from")
    object_from: str = Field(description="how the part was found")
    object_share: Finite = Field(description="share of the reference the part covers")


class Manifest(Settings):
    """What a bundle is; validated by the same models as the configuration (``ModelSpec``)."""

    format: Literal["inspection-bundle/4"] = FORMAT
    model: ModelSpec = Field(description="the method and its settings, backbone, taps, input, tiling, mask")
    frame_size: list[int] = Field(description="[height, width] of the frames calibrated on")
    decision: Decision = Field(description="the image and pixel thresholds (engines/decision.py)")
    mask_files: list[MaskReference] = Field(default_factory=list, description="features mask: reference files")
    mask_learnt: str | None = Field(None, description="learnt and features masks: the part's shape learnt from the "
                                                      "good images, a bundle file")
    score_stats: dict[str, Any] = Field(default_factory=dict, description="figures from fitting and the held-out "
                                                                          "scores")
    files: dict[str, Sha256] = Field(default_factory=dict, description="bundle file name (relative, /) -> SHA-256")
    versions: dict[str, str] = Field(default_factory=dict, description="library versions that wrote the bundle")
    created: Finite = Field(0.0, description="Unix time of calibration")
    model_id: str = Field("", description="method-<12 hex digits of the SHA-256 of the rest of the manifest>")

    @field_validator("frame_size")
    @classmethod
    def _frame_size(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or any(s < 1 for s in v):
            raise ValueError(f"expected [height, width] in pixels, got {v}")
        return v

    @property
    def method(self) -> str:
        return self.model.method.kind

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.model.input_hw


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    def network_state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / NETWORK))

    def head_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / HEAD))

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX


# --- writing -----------------------------------------------------------------------------------

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
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "agent": "0.1.0"}


def write_tensors(path: Path, network: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in network.items()}, str(path / NETWORK))
    save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / HEAD))


def write_manifest(path: Path, manifest: Manifest) -> Bundle:
    """Hash every payload file, derive the model id from the whole manifest and write it."""
    # Every payload file is covered (mask references included); plans carry their own manifest.
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.name != MANIFEST and p.relative_to(path).parts[0] != "plans")
    manifest.files = {name: sha256(path / name) for name in files}
    manifest.versions = versions()
    manifest.created = manifest.created or time.time()
    data = manifest.model_dump(mode="json")
    mpath = path / MANIFEST
    _validate(data, mpath)  # as loading checks it: a malformed manifest is never written
    manifest.model_id = data["model_id"] = model_id(data)
    mpath.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))
    return Bundle(path, manifest)


def model_id(data: dict[str, Any]) -> str:
    """``method-`` and 12 hex digits of the SHA-256 of the canonical JSON of everything but the id:
    any change to the manifest (a threshold, a hash, the tiling, ...) is a different model."""
    content = {k: v for k, v in data.items() if k != "model_id"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    method = (data.get("model") or {}).get("method", {}).get("kind", "model")
    return f"{method}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


# --- loading -----------------------------------------------------------------------------------

def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """The bundle at ``path``, checked; ``verify=False`` skips what reads the payload (the model id,
    the file hashes and the ONNX check), for tools that repair a bundle before re-writing it."""
    path = Path(path)
    mpath = path / MANIFEST
    data = _read_manifest(mpath)
    manifest = _validate(data, mpath)
    files = {name: _inside(path, name) for name in manifest.files}
    _mask_files_hashed(path, manifest, files)
    if verify:
        _check_model_id(mpath, data)
        for name, expected in manifest.files.items():
            _check_hash(files[name], expected, manifest.model_id)
        for name in (n for n in files if n.endswith(".onnx")):
            _check_onnx_self_contained(files[name], manifest.model_id)
    return Bundle(path, manifest)


def _read_manifest(mpath: Path) -> dict[str, Any]:
    if not mpath.is_file():
        raise BundleError(f"{mpath.parent}: not a model bundle (no {MANIFEST})")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest: {e}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{mpath}: top level: expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt in OLDER_FORMATS:
        raise BundleError(f"{mpath}: format: {fmt!r} is older than this agent's {FORMAT!r}; recalibrate the "
                          "bundle with this agent")
    if fmt != FORMAT:
        raise BundleError(f"{mpath}: format: expected {FORMAT!r}, got {fmt!r}")
    return data


def _validate(data: dict[str, Any], mpath: Path) -> Manifest:
    # JSON mode, as a loaded manifest is validated: strict types, lists where tuples would be.
    try:
        manifest = Manifest.model_validate_json(json.dumps(data))
    except ValidationError as e:
        raise BundleError(describe(e, mpath, root=Manifest)) from None
    missing = [name for name in (NETWORK, HEAD) if manifest.files and name not in manifest.files]
    if missing:
        raise BundleError(f"{mpath}: files: expected {' and '.join(missing)} among the hashed files")
    return manifest


def _inside(bundle: Path, name: str) -> Path:
    """The bundle file ``name``; a BundleError where the name could reach outside the bundle."""
    parts = name.split("/")
    reason = ("has a backslash (names use /)" if "\\" in name
              else "is absolute" if name.startswith("/") or PureWindowsPath(name).drive
              else "has a '..' component" if ".." in parts
              else "has an empty or '.' component" if any(p in ("", ".") for p in parts)
              else None)
    if reason:
        raise BundleError(f"{bundle}: file name {name!r} in the manifest {reason}; bundle files are plain "
                          "relative names inside the bundle")
    path = bundle
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{bundle}: file name {name!r} in the manifest goes through a symbolic link "
                              f"({path.relative_to(bundle).as_posix()}); a bundle holds its own files")
    if not path.resolve().is_relative_to(bundle.resolve()):
        raise BundleError(f"{bundle}: file name {name!r} in the manifest resolves outside the bundle")
    return path


def _mask_files_hashed(bundle: Path, manifest: Manifest, files: dict[str, Path]) -> None:
    if manifest.mask_learnt is not None and manifest.mask_learnt not in files:
        raise BundleError(f"{bundle}: mask_learnt: {manifest.mask_learnt!r} is not among the bundle's hashed files")
    for i, ref in enumerate(manifest.mask_files):
        for key in ("image", "object"):
            name = getattr(ref, key)
            if name not in files:
                raise BundleError(f"{bundle}: mask_files[{i}].{key}: {name!r} is not among the bundle's hashed "
                                  "files")


def _check_model_id(mpath: Path, data: dict[str, Any]) -> None:
    actual = model_id(data)
    if actual != data["model_id"]:
        raise BundleError(f"{mpath.parent}: {MANIFEST} was edited after calibration: its content gives id {actual}; "
                          f"refusing model {data['model_id']}")


def _check_hash(path: Path, expected: str, model: str) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: bundle file is missing (model {model})")
    actual = sha256(path)
    if actual != expected:
        raise BundleError(f"{path}: content hash mismatch (manifest sha256 {expected[:16]}..., file {actual[:16]}...); "
                          f"refusing model {model}: the bundle was altered or damaged")


def _check_onnx_self_contained(path: Path, model: str) -> None:
    # ONNX Runtime would read external data from wherever the model points, hashed or not.
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise BundleError(f"{path}: not a readable ONNX model ({e}); refusing model {model}") from None
    tensors = chain(_graph_tensors(proto.graph), *(_node_tensors(f.node) for f in proto.functions))
    external = next((t for t in tensors if uses_external_data(t)), None)
    if external is not None:
        raise BundleError(f"{path}: tensor {external.name!r} keeps its data in an external file; refusing model "
                          f"{model}: a bundle's ONNX networks must be self-contained")


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[NodeProto]) -> Iterator[TensorProto]:
    """Constants in node attributes, and everything in subgraphs (If, Loop, Scan)."""
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for g in a.graphs:
                yield from _graph_tensors(g)
