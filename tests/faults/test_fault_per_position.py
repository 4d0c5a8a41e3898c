"""Fault class 9: a bundle with statistics per tile position is served from a real source (the
warm-up uses a frame of the calibrated size)."""
from __future__ import annotations

import shutil

import pytest

from fault_helpers import run_agent, verdicts, wait_until, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def per_position_bundle(sample_data, tmp_path_factory):
    from calibration.settings import ModelConfig
    from calibration.calibrate import calibrate

    cfg = ModelConfig.model_validate({"input_size": [64, 64], "method": {"dims": 32},
                                      "tiling": {"enabled": True, "overlap": 0.25, "stats": "per_position"}})
    return calibrate(sample_data, tmp_path_factory.mktemp("pp") / "bundle", cfg, progress=False)


def test_per_position_bundle_serves_a_folder(mosquitto, subscribers, per_position_bundle, sample_data,
                                             tmp_path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted((sample_data / "test").rglob("*.png"))[:6]:
        shutil.copy(p, frames / f"{p.parent.name}_{p.name}")
    sub = subscribers(mosquitto, prefix="plant/faults")
    code, log = run_agent(write_config(tmp_path, mosquitto, per_position_bundle.path,
                                       {"kind": "folder", "path": str(frames)}))
    assert code == 0, log[-3000:]
    wait_until(lambda: len(verdicts(sub)) == 6, "6 verdicts")
    assert all(v["status"] in ("ok", "ng") for v in verdicts(sub).values())
