"""Fault class 1: one exit-code contract (0 deliberate end, 2 configuration before READY, else 1),
and a live source that never "finishes"."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import cv2
import pytest

from fault_helpers import (Agent, check_config, one_line_error, run_agent, synthetic, verdicts, wait_until,
                           write_config)

pytestmark = pytest.mark.slow


def copy_frames(sample_data: Path, folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    goods = sorted((sample_data / "test" / "good").glob("*.png"))[:n]
    for p in goods:
        shutil.copy(p, folder / p.name)
    return [p.stem for p in goods]


def test_batch_folder_read_to_its_end_exits_0(mosquitto, subscribers, padim_bundle, sample_data, tmp_path) -> None:
    stems = copy_frames(sample_data, tmp_path / "frames", 4)
    sub = subscribers(mosquitto, prefix="plant/faults")
    code, log = run_agent(write_config(tmp_path, mosquitto, padim_bundle.path,
                                       {"kind": "folder", "path": str(tmp_path / "frames")}))
    assert code == 0, log[-3000:]
    wait_until(lambda: set(verdicts(sub)) == set(stems), "one verdict per file")


def test_max_frames_exits_0(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    sub = subscribers(mosquitto, prefix="plant/faults")
    code, log = run_agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0)), "--max-frames", "5")
    assert code == 0, log[-3000:]
    wait_until(lambda: len(verdicts(sub)) == 5, "5 verdicts")


def test_sigterm_exits_0(mosquitto, padim_bundle, tmp_path) -> None:
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(0, fps=20)))
    agent.wait_ready()
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.log[-3000:]


def test_configuration_error_exits_2_with_one_line_naming_file_and_key(mosquitto, padim_bundle, tmp_path) -> None:
    config = write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(3), mqtt={"qos": True})
    code, log = run_agent(config)
    assert code == 2
    line = one_line_error(log)
    assert str(config) in line and "mqtt.qos" in line


def test_unreadable_video_is_not_a_deliberate_end(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    video = tmp_path / "broken.avi"
    video.write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST not a video at all")
    sub = subscribers(mosquitto, prefix="plant/faults")
    code, log = run_agent(write_config(tmp_path, mosquitto, padim_bundle.path, {"kind": "video", "path": str(video)}))
    assert code == 1, log[-3000:]  # a batch that was not read to its end: systemd may retry
    wait_until(lambda: len(verdicts(sub)) == 1, "the error verdict")
    (v,) = verdicts(sub).values()
    assert v["status"] == "error" and "broken.avi" in v["error"]


def test_a_live_source_never_finishes_its_faults_are_counted(mosquitto, subscribers, padim_bundle, sample_data,
                                                             tmp_path) -> None:
    folder = tmp_path / "watched"
    folder.mkdir()
    sub = subscribers(mosquitto, prefix="plant/faults")
    agent = Agent(write_config(tmp_path, mosquitto, padim_bundle.path,
                               {"kind": "folder", "path": str(folder), "watch": True, "poll_s": 0.1,
                                "settle_s": 0.2, "reconnect_min_s": 0.1, "reconnect_max_s": 0.2}))
    try:
        agent.wait_ready()
        shutil.rmtree(folder)  # the share goes away ...
        wait_until(lambda: any("WARNING" in line and str(folder) in line for line in agent.lines),
                   "a warning naming the folder")
        assert agent.proc.poll() is None, "a live source must not end the service"
        stems = copy_frames(sample_data, tmp_path / "later", 2)
        shutil.copytree(tmp_path / "later", folder)  # ... and comes back
        wait_until(lambda: len(verdicts(sub)) == 2, "verdicts for files after the folder returned")
        assert all(fid.startswith(tuple(stems)) for fid in verdicts(sub))
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
        health = agent.health()
        assert health["source"]["errors"] >= 1 and health["frames"] == 2
    finally:
        agent.kill()


def test_check_config_refuses_what_run_refuses(mosquitto, padim_bundle, tmp_path) -> None:
    (tmp_path / "a_directory").mkdir()
    config = write_config(tmp_path, mosquitto, padim_bundle.path, synthetic(3),
                          mqtt={"spool_path": str(tmp_path / "a_directory")})
    run_code, run_log = run_agent(config)
    check_code, check_log = check_config(config)
    assert run_code == check_code == 2
    assert "mqtt.spool_path" in one_line_error(run_log) and "mqtt.spool_path" in one_line_error(check_log)


def test_unreadable_image_in_a_folder_gives_an_error_verdict_not_an_exit(mosquitto, subscribers, padim_bundle,
                                                                           tmp_path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    img = (255 * (cv2.getGaussianKernel(64, 10) @ cv2.getGaussianKernel(64, 10).T)).astype("uint8")
    cv2.imwrite(str(folder / "a.png"), img)
    (folder / "b.png").write_bytes(b"")
    sub = subscribers(mosquitto, prefix="plant/faults")
    code, log = run_agent(write_config(tmp_path, mosquitto, padim_bundle.path, {"kind": "folder", "path": str(folder)}))
    assert code == 0, log[-3000:]
    wait_until(lambda: len(verdicts(sub)) == 2, "two verdicts")
    assert verdicts(sub)["b"]["status"] == "error"
