"""``inspection-agent predict``, the commissioning tool: the real command on real files, no broker."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "agent" / "verdict.schema.json").read_text())


def predict(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent", "predict", *args, "--backend", "onnxruntime"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture
def one_thread(tmp_path: Path) -> Path:
    config = tmp_path / "predict.yaml"
    config.write_text("runtime:\n  threads: 1\nagent:\n  image_max_side: 96\n")
    return config


def test_a_folder_gives_overlays_a_csv_and_valid_verdicts(padim_bundle, sample_data: Path, tmp_path: Path,
                                                         one_thread: Path) -> None:
    folder = tmp_path / "commissioning"
    shutil.copytree(sample_data / "test", folder)
    (folder / "good" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    out = tmp_path / "out"
    r = predict("--model", str(padim_bundle.path), "--input", str(folder), "--out", str(out), config=one_thread)
    assert r.returncode == 0, r.stderr[-3000:]

    verdicts = json.loads((out / "verdicts.json").read_text())
    validator = Draft202012Validator(SCHEMA)
    for v in verdicts:
        validator.validate(v)
    assert [v["frame_id"] for v in verdicts] == images  # one per image, in path order
    by_id = {v["frame_id"]: v for v in verdicts}
    assert by_id["good/zz-broken.png"]["status"] == "error" and "zz-broken.png" in by_id["good/zz-broken.png"]["error"]

    with open(out / "verdicts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["frame_id"] for row in rows] == images
    for row in rows:
        v = by_id[row["frame_id"]]
        assert row["status"] == v["status"] and Path(row["file"]) == folder / row["frame_id"]
        assert int(row["regions"]) == len(v["regions"])
        if v["status"] == "error":
            assert row["overlay"] == "" and row["error"] == v["error"]
            continue
        assert float(row["normalized_score"]) == pytest.approx(v["normalized_score"])
        overlay = cv2.imread(str(out / row["overlay"]))
        assert row["overlay"] == f"overlays/{row['frame_id']}.jpg" and overlay.shape == (80, 96, 3)

    summary = json.loads(r.stdout)
    assert summary["images"] == len(images) and summary["error"] == 1
    assert summary["ok"] + summary["ng"] == len(images) - 1 and summary["model_id"] == padim_bundle.manifest.model_id


def test_one_image(padim_bundle, sample_data: Path, tmp_path: Path, one_thread: Path) -> None:
    image = sorted((sample_data / "test" / "good").glob("*.png"))[0]
    r = predict("--model", str(padim_bundle.path), "--input", str(image), "--out", str(tmp_path / "out"),
                config=one_thread)
    assert r.returncode == 0, r.stderr[-3000:]
    (verdict,) = json.loads((tmp_path / "out" / "verdicts.json").read_text())
    assert verdict["frame_id"] == image.name and (tmp_path / "out" / "overlays" / f"{image.name}.jpg").is_file()


@pytest.mark.parametrize("make, expected", [
    (lambda p: p / "missing", "--input: no such file or folder"),
    (lambda p: p, "--input: no image files"),
])
def test_nothing_to_score_is_one_line_and_exit_2(padim_bundle, tmp_path: Path, make, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    r = predict("--model", str(padim_bundle.path), "--input", str(make(tmp_path)), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_version() -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "--version"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("inspection-agent ") and "verdict schema 1." in r.stdout
