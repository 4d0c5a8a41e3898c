"""Sealed bundles: each way a damaged bundle is refused, loading without torch, and calibrate
replacing a bundle only with a complete one."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engines.bundle import MANIFEST, ONNX, BundleError, load_bundle, model_id, sha256, write_manifest

from conftest import small_model_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def copy(padim_bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(padim_bundle.path, dst)
    return dst


def _edit(bundle: Path, change: Callable[[dict[str, Any]], None], reseal: bool = False) -> None:
    """Change the manifest; ``reseal`` recomputes the model id, as someone who knows the scheme
    would, so that only the check under test can refuse it."""
    mpath = bundle / MANIFEST
    data = json.loads(mpath.read_text())
    change(data)
    if reseal:
        data["model_id"] = model_id(data)
    mpath.write_text(json.dumps(data))


def _refused(bundle: Path, *fragments: str) -> str:
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    message = str(e.value)
    assert "\n" not in message and str(bundle) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_untouched_copy_loads(padim_bundle, copy: Path) -> None:
    bundle = load_bundle(copy)
    assert bundle.manifest.model_id == padim_bundle.manifest.model_id
    assert bundle.manifest.frame_size == [160, 192]  # sample_data's frames, not the model input


# --- file names stay inside the bundle -------------------------------------------------------------

def _list_file(name: str, digest: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["files"].update({name: digest})


def test_a_name_that_climbs_out_is_refused(copy: Path) -> None:
    (copy.parent / "x").write_bytes(b"outside")
    _edit(copy, _list_file("../x", sha256(copy.parent / "x")), reseal=True)
    _refused(copy, "'../x'", "'..'")


def test_an_absolute_name_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"outside")
    _edit(copy, _list_file(str(outside), sha256(outside)), reseal=True)
    _refused(copy, repr(str(outside)), "is absolute")


def test_a_backslash_in_a_name_is_refused(copy: Path) -> None:
    _edit(copy, _list_file("mask\\ref_0.png", "ab" * 32), reseal=True)
    _refused(copy, "backslash")


@pytest.mark.parametrize("link", ["link.bin", "sub"])
def test_a_symbolic_link_out_of_the_bundle_is_refused(copy: Path, tmp_path: Path, link: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "link.bin").write_bytes(b"outside")
    # A linked file, or a linked folder on the way to a file.
    (copy / link).symlink_to(outside / "link.bin" if link == "link.bin" else outside)
    name = "link.bin" if link == "link.bin" else "sub/link.bin"
    _edit(copy, _list_file(name, sha256(outside / "link.bin")), reseal=True)
    _refused(copy, repr(name), "symbolic link")


def test_a_mask_file_outside_the_hashed_files_is_refused(copy: Path) -> None:
    (copy / "mask").mkdir()
    for name in ("ref_0.png", "object_0.png"):
        (copy / "mask" / name).write_bytes(b"not hashed")
    reference = {"image": "mask/ref_0.png", "object": "mask/object_0.png", "source": "000.png",
                 "object_from": "frame", "object_share": 1.0}
    _edit(copy, lambda data: data.update(mask_files=[reference]), reseal=True)
    _refused(copy, "mask_files[0].image", "'mask/ref_0.png'", "not among the bundle's hashed files")


# --- the model id covers the whole manifest ---------------------------------------------------------

def test_an_edited_threshold_is_refused(padim_bundle, copy: Path) -> None:
    _edit(copy, lambda data: data["decision"].update(image_threshold=data["decision"]["image_threshold"] * 2))
    _refused(copy, "manifest.json was edited after calibration",
             f"refusing model {padim_bundle.manifest.model_id}")


def test_the_id_changes_with_any_section(padim_bundle) -> None:
    data = json.loads((padim_bundle.path / MANIFEST).read_text())
    assert model_id(data) == padim_bundle.manifest.model_id
    for section in ("model", "decision", "score_stats", "versions", "files"):
        edited = json.loads(json.dumps(data))
        edited[section]["added"] = 1
        assert model_id(edited) != model_id(data), section


# --- typed manifest ---------------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragments", [
    (lambda d: d["decision"].pop("center"), ["manifest.json: decision.center: missing"]),
    (lambda d: d.pop("decision"), ["manifest.json: decision: missing"]),
    (lambda d: d["decision"].update(image_threshold="0.5"), ["manifest.json: decision.image_threshold:",
                                                             "expected a number", "'0.5'"]),
    (lambda d: d["model"].update(input_size=[100000, 100000]), ["manifest.json: model.input_size: expected "
                                                                "[height, width]", "[100000, 100000]"]),
    (lambda d: d["model"].update(input_size=[128, 128.0]), ["manifest.json: model.input_size[1]:",
                                                            "expected an integer"]),
    (lambda d: d["model"]["method"].update(dims=-3), ["manifest.json: model.method.dims: expected at least 1"]),
    (lambda d: d["model"]["method"].update(kind="magic"), ["manifest.json: model.method: expected kind one of"]),
    (lambda d: d["decision"].update(image_threshold=math.nan), ["manifest.json: decision.image_threshold: "
                                                               "expected a finite"]),
    (lambda d: d["files"].update({ONNX: "0" * 63}), ["manifest.json: files.model.onnx: expected a SHA-256"]),
    (lambda d: d.update(surprise=1), ["manifest.json: unknown key 'surprise'"]),
    (lambda d: d.update(format="inspection-bundle/9"), ["manifest.json: format: expected 'inspection-bundle/4'"]),
    (lambda d: d.update(format="inspection-bundle/2"), ["manifest.json: format:", "recalibrate"]),
], ids=["missing-key", "missing-section", "wrong-type", "absurd-size", "float-size", "bad-method-setting",
        "unknown-method", "nan-threshold", "short-hash", "unknown-key", "unknown-format", "old-format"])
def test_a_malformed_manifest_is_refused_naming_the_key(copy: Path, change: Callable, fragments: list[str]) -> None:
    _edit(copy, change)
    _refused(copy, *fragments)


def test_write_manifest_refuses_what_would_not_load(copy: Path) -> None:
    manifest = load_bundle(copy).manifest.model_copy(update={"frame_size": [0, 10]})  # unchecked, as a bug would
    with pytest.raises(BundleError, match="frame_size: expected"):
        write_manifest(copy, manifest)


# --- ONNX with external data ------------------------------------------------------------------------

def test_onnx_with_external_data_is_refused(copy: Path) -> None:
    import onnx

    proto = onnx.load(str(copy / ONNX))
    onnx.save_model(proto, str(copy / ONNX), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    write_manifest(copy, load_bundle(copy, verify=False).manifest)  # hashes and id agree: only the data is wrong
    assert "model.onnx.data" in load_bundle(copy, verify=False).manifest.files
    _refused(copy, f"{copy / ONNX}:", "external file")


# --- loading without torch --------------------------------------------------------------------------

def test_loading_a_bundle_imports_no_torch(copy: Path) -> None:
    code = ("import sys, engines.bundle; bundle = engines.bundle.load_bundle(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(bundle.manifest.model_id)")
    r = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == load_bundle(copy).manifest.model_id


# --- calibrate --out --------------------------------------------------------------------------------

def _leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def test_calibrate_refuses_to_replace_what_is_not_a_bundle(sample_data: Path, tmp_path: Path) -> None:
    from calibration.calibrate import calibrate

    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"photos: not a model bundle \(no manifest.json\) and not empty") as e:
        calibrate(sample_data, out, small_model_config(), progress=False)
    assert "\n" not in str(e.value)
    assert _snapshot(out) == {"holiday.jpg": b"keep me"} and not _leftovers(out)


def test_recalibration_replaces_the_bundle(copy: Path, sample_data: Path) -> None:
    from calibration.calibrate import calibrate

    before = load_bundle(copy).manifest
    bundle = calibrate(sample_data, copy, small_model_config(), progress=False)
    assert bundle.path == copy and load_bundle(copy).manifest.model_id == bundle.manifest.model_id
    assert bundle.manifest.model_id != before.model_id  # another calibration, another time: another id
    assert not _leftovers(copy)


def test_an_unavailable_mask_detector_is_refused_and_keeps_the_bundle(copy: Path, sample_data: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    import calibration.calibrate as cal
    from engines.masks import MaskConfig

    # An OpenCV build without AKAZE (the main OpenCV 5 wheel): neither cv2 nor its contrib has it.
    for where in (cv2, getattr(cv2, "xfeatures2d", None)):
        if where is not None and hasattr(where, "AKAZE_create"):
            monkeypatch.delattr(where, "AKAZE_create")
    fits: list[str] = []
    monkeypatch.setattr(cal, "implementation", lambda kind: fits.append(kind))  # fitting must not start
    before = _snapshot(copy)
    cfg = small_model_config(mask=MaskConfig(kind="features", detector="akaze"))
    with pytest.raises(ValueError, match="mask.detector: 'akaze' is not in this OpenCV build"):
        cal.calibrate(sample_data, copy, cfg, progress=False)
    assert fits == []
    assert _snapshot(copy) == before and not _leftovers(copy)
    load_bundle(copy)


def test_a_calibration_failing_half_way_keeps_the_bundle(copy: Path, sample_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import calibration.calibrate as cal

    before = _snapshot(copy)
    written: list[str] = []

    def fail(*args: Any, **kwargs: Any) -> None:
        written.extend(p.name for p in _leftovers(copy) for p in p.iterdir())
        raise RuntimeError("disk full")

    monkeypatch.setattr(cal, "choose_threshold", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        cal.calibrate(sample_data, copy, small_model_config(), progress=False)
    assert {"network.safetensors", "head.safetensors", ONNX} <= set(written)  # it did fail half-way
    assert _snapshot(copy) == before and not _leftovers(copy)
    load_bundle(copy)
