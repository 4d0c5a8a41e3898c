"""Fault class 6: sealed bundles. A damaged or edited bundle is refused by ``run`` before READY
with one line (exit 2); ``calibrate --out`` never destroys what it cannot replace."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from engines.bundle import load_bundle
from fault_helpers import REPO, one_line_error, run_agent, synthetic, write_config

pytestmark = pytest.mark.slow


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


DAMAGES = {
    "edited threshold": lambda m: m["decision"].update(image_threshold=m["decision"]["image_threshold"] * 10),
    "path out of the bundle": lambda m: m["files"].update({"../outside.bin": "0" * 64}),
    "missing key": lambda m: m.pop("frame_size"),
    "wrong type": lambda m: m["model"].update(input_size="256x256"),
    "absurd input size": lambda m: m["model"].update(input_size=[100000, 100000]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_bundle_is_refused_before_ready(mosquitto, padim_bundle, tmp_path, damage) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(padim_bundle.path, bundle)
    edit_manifest(bundle, DAMAGES[damage])
    code, log = run_agent(write_config(tmp_path, mosquitto, bundle, synthetic(3)))
    assert code == 2, log[-3000:]
    line = one_line_error(log)
    assert "agent.model" in line and str(bundle) in line


def test_a_tampered_tensor_is_refused(mosquitto, padim_bundle, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(padim_bundle.path, bundle)
    head = bundle / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    code, log = run_agent(write_config(tmp_path, mosquitto, bundle, synthetic(3)))
    assert code == 2 and "head.safetensors" in one_line_error(log)


def calibrate(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    config = out.parent / f"{out.name}-calibration.yaml"
    config.write_text("model:\n  input_size: [64, 64]\n  method:\n    dims: 16\n" + "".join(extra))
    return subprocess.run([sys.executable, "-m", "agent", "calibrate", "--config", str(config), "--data", str(data),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_calibrate_refuses_to_replace_a_folder_that_is_not_a_bundle(sample_data, tmp_path) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("a week of measurements")
    r = calibrate(sample_data, precious)
    assert r.returncode == 2 and "not a model bundle" in one_line_error(r.stderr)
    assert (precious / "notes.txt").read_text() == "a week of measurements"


def test_a_failed_calibration_keeps_the_bundle_the_line_runs(sample_data, tmp_path) -> None:
    # Where the mask code looks for them (engines/masks.py): cv2, then the contrib modules. The refusal of
    # a detector this build lacks is also tested with the detector hidden (tests/test_bundle.py).
    contrib = getattr(cv2, "xfeatures2d", None)
    missing = next((d for d in ("akaze", "brisk")
                    if not hasattr(cv2, f"{d.upper()}_create") and not hasattr(contrib, f"{d.upper()}_create")), None)
    out = tmp_path / "line-bundle"
    assert calibrate(sample_data, out).returncode == 0
    before = load_bundle(out).manifest.model_id
    # A run that fails half-way: a corrupt training image, met while fitting.
    broken = tmp_path / "broken-data"
    shutil.copytree(sample_data, broken)
    sorted((broken / "train" / "good").glob("*.png"))[-1].write_bytes(b"not an image")
    r = calibrate(broken, out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert load_bundle(out).manifest.model_id == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial bundle left
    if missing:  # an unavailable detector is refused before any fitting, and the bundle stays
        r = calibrate(sample_data, out, f"  mask:\n    kind: features\n    detector: {missing}\n")
        assert r.returncode == 2 and "mask" in r.stderr
        assert load_bundle(out).manifest.model_id == before
