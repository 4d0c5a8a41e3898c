"""``python -m calibration.validate``: a bundle scored on its held-out good images plus synthetic
defects, through the pipeline calibration uses, without ever reading test/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration.calibrate import reference_pipeline, split_train
from calibration.data import DataError, read_image, train_samples
from calibration.defects import KINDS
from calibration.evaluate import evaluate
from calibration.validate import main, validate, validation_frames


@pytest.fixture(scope="module")
def trapped_data(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample_data's train/good beside a test/ whose every image is unreadable: reading it fails."""
    root = tmp_path_factory.mktemp("trapped") / "part"
    (root / "train").mkdir(parents=True)
    (root / "train" / "good").symlink_to(sample_data / "train" / "good")
    for kind in ("good", "crack"):
        (root / "test" / kind).mkdir(parents=True)
        (root / "test" / kind / "000.png").write_bytes(b"not an image")
    return root


def test_the_trap_breaks_whatever_reads_test(padim_bundle, trapped_data: Path) -> None:
    with pytest.raises(DataError, match="cannot read image"):
        evaluate(padim_bundle, reference_pipeline(padim_bundle), trapped_data, progress=False)


def test_validate_reports_the_metrics_of_held_out_and_synthetic_images(
        padim_bundle, trapped_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 2 * len(KINDS)
    assert main(["--model", str(padim_bundle.path), "--data", str(trapped_data), "--defects", str(n), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    held = padim_bundle.manifest.score_stats["holdout_good"]["n"]
    assert (out["n_images"], out["n_anomalous"]) == (held + n, n)
    assert set(out["per_kind"]) == set(KINDS) and all(m["n_anomalous"] == 2 for m in out["per_kind"].values())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro", "f1_max"):
        assert 0.0 <= out[key] <= 1.0, key
    # Pixel AUPR at chance is the defect pixels' share, a few per cent here: the maps rank them.
    assert out["image_auroc"] > 0.9 and out["pixel_auroc"] > 0.9 and out["pixel_aupr"] > 0.3
    assert main(["--model", str(padim_bundle.path), "--data", str(trapped_data), "--defects", "6"]) == 0
    assert "pixel_aupr" in capsys.readouterr().out


def test_the_set_is_calibrations_held_out_split_scored_as_the_line_scores(padim_bundle, trapped_data: Path) -> None:
    _, held = split_train([s.path for s in train_samples(trapped_data)], 0.2, 0)
    frames = validation_frames(trapped_data, 0.2, 0, len(KINDS))
    assert [f[0] for f in frames[:len(held)]] == [p.name for p in held]
    assert [f[1] for f in frames[len(held):]] == list(KINDS)
    assert all(not f[3].any() for f in frames[:len(held)]) and all(f[3].any() for f in frames[len(held):])
    ev = validate(padim_bundle, trapped_data, len(KINDS), 0.2, 0, progress=False)
    line = reference_pipeline(padim_bundle).score_frame(read_image(held[0]))
    assert ev.scores[0] == pytest.approx(line.score)


def test_a_split_other_than_the_bundles_is_refused(padim_bundle, trapped_data: Path) -> None:
    with pytest.raises(ValueError, match="held-out images"):
        validate(padim_bundle, trapped_data, 3, 0.5, 0, progress=False)
