"""Fault class 2: every frame gives exactly one verdict, whatever its bytes; large frames are scored
at a bounded map size with boxes in frame pixels."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from calibration.synthetic import synthetic_part
from fault_helpers import run_agent, verdicts, wait_until, write_config

pytestmark = pytest.mark.slow

MAX_PIXELS = 30_000_000


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 RGB pixels, in 57 bytes."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + \
        png_chunk(b"IEND", b"")


def write_frames(folder: Path) -> tuple[dict[str, str], np.ndarray]:
    """Files of every kind; returns {stem: expected status} and the large frame's defect mask."""
    folder.mkdir()
    rng = np.random.default_rng(5)
    good, _ = synthetic_part(rng, (160, 192), None)
    expected = {}

    def put(name: str, data: bytes, status: str) -> None:
        (folder / name).write_bytes(data)
        expected[Path(name).stem] = status

    put("00_good.png", cv2.imencode(".png", good)[1].tobytes(), "judged")
    put("01_bomb.png", decompression_bomb(), "error")
    jpeg = cv2.imencode(".jpg", good)[1].tobytes()
    put("02_truncated.jpg", jpeg[: len(jpeg) // 2], "error")
    put("03_empty.png", b"", "error")
    put("04_text.png", b"this is a log file, not an image\n" * 20, "error")
    put("05_deep.png", cv2.imencode(".png", good.astype(np.uint16) * 257)[1].tobytes(), "judged")
    put("06_grey.bmp", cv2.imencode(".bmp", cv2.cvtColor(good, cv2.COLOR_BGR2GRAY))[1].tobytes(), "judged")
    put("07_part.tif", cv2.imencode(".tif", good)[1].tobytes(), "judged")
    put("08_part.webp", cv2.imencode(".webp", good)[1].tobytes(), "judged")
    Image.fromarray(good[..., ::-1]).save(folder / "09_part.gif")
    expected["09_part"] = "judged"
    oversize = np.zeros((6000, 6000, 3), np.uint8)  # 36 MP: more than MAX_PIXELS, compresses to little
    put("10_oversize.png", cv2.imencode(".png", oversize)[1].tobytes(), "error")
    # 19 MP: allowed. A defective part drawn small (the model's aspect) and scaled up.
    part, mask = synthetic_part(np.random.default_rng(11), (400, 480), "scratch")
    big = cv2.resize(part, (4800, 4000), interpolation=cv2.INTER_LINEAR)
    big_mask = cv2.resize(mask.astype(np.uint8), (4800, 4000), interpolation=cv2.INTER_NEAREST).astype(bool)
    put("11_large.png", cv2.imencode(".png", big, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes(), "judged")
    return expected, big_mask


def test_every_file_gives_one_verdict_whatever_its_bytes(mosquitto, subscribers, padim_bundle, tmp_path) -> None:
    expected, big_mask = write_frames(tmp_path / "frames")
    sub = subscribers(mosquitto, prefix="plant/faults")
    config = write_config(tmp_path, mosquitto, padim_bundle.path,
                          {"kind": "folder", "path": str(tmp_path / "frames"), "max_pixels": MAX_PIXELS})
    code, log = run_agent(config, timeout=180)
    assert code == 0, log[-3000:]
    wait_until(lambda: len(verdicts(sub)) == len(expected), f"{len(expected)} verdicts")
    got = verdicts(sub)
    assert set(got) == set(expected)
    assert len(sub.on("plant/faults/verdict")) == len(expected)  # exactly one each
    for stem, status in expected.items():
        v = got[stem]
        if status == "error":
            assert v["status"] == "error", (stem, v)
            assert stem in v["error"], v["error"]  # names the file
        else:
            assert v["status"] in ("ok", "ng"), (stem, v.get("error"))
    assert "10000000000 pixels" in got["01_bomb"]["error"]
    assert "max_pixels" in got["10_oversize"]["error"]

    large = got["11_large"]
    assert large["status"] == "ng" and large["regions"]
    ys, xs = np.nonzero(big_mask)
    for r in large["regions"]:
        assert 0 <= r["x"] < r["x"] + r["w"] <= 4800 and 0 <= r["y"] < r["y"] + r["h"] <= 4000
    top = large["regions"][0]  # the strongest region lies on the drawn defect, in frame pixels
    assert top["x"] <= xs.max() and top["x"] + top["w"] >= xs.min()
    assert top["y"] <= ys.max() and top["y"] + top["h"] >= ys.min()
    assert "Traceback" not in log
