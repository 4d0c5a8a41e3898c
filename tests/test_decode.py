"""Guarded decoding through real Pillow and OpenCV: what is refused before decoding, and the
format every accepted file comes out in."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from agent.decode import FrameError, decode_image, max_file_bytes, read_image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height``: signature, IHDR with
    a correct CRC, IEND. Decoding it would allocate the whole claimed image."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encoded(ext: str, image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def colour_image() -> np.ndarray:
    img = np.zeros((48, 64, 3), np.uint8)
    img[..., 2] = 200  # red in BGR
    img[:, :32, 0] = 100
    return img


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 64
    with pytest.raises(FrameError, match=r"^bomb\.png: .*10000000000 pixels"):
        decode_image(bomb, "bomb.png", 50_000_000, grey=False)


def test_a_header_over_max_pixels_is_refused_naming_its_size():
    with pytest.raises(FrameError) as err:
        decode_image(png_header_only(9000, 9000), "wide.png", 50_000_000, grey=False)
    assert str(err.value) == ("wide.png: header says 9000 x 9000 = 81000000 pixels, "
                              "more than source.max_pixels 50000000")


def test_a_real_image_over_max_pixels_is_refused():
    with pytest.raises(FrameError, match=r"^a\.png: header says 64 x 48 = 3072 pixels, .* 2048$"):
        decode_image(encoded(".png", colour_image()), "a.png", 2048, grey=False)


def test_a_file_larger_than_any_image_within_max_pixels_is_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(b"\0" * (max_file_bytes(1024) + 1))
    with pytest.raises(FrameError, match=rf"^{path}: file is \d+ bytes, more than any image within "
                                         r"source.max_pixels 1024"):
        read_image(path, 1024, grey=False)


@pytest.mark.parametrize("name, data, reason", [
    ("empty.jpg", b"", "empty file"),
    ("notes.png", b"this is text, not a picture\n" * 4, "unsupported format or corrupt header"),
    ("cut.jpg", encoded(".jpg", colour_image())[:300], "corrupt or truncated"),
    ("cut.png", encoded(".png", colour_image())[:-40], "cannot decode (corrupt or truncated)"),
])
def test_bad_files_are_refused_naming_the_file_and_the_reason(name, data, reason):
    with pytest.raises(FrameError) as err:
        decode_image(data, name, 50_000_000, grey=False)
    assert str(err.value).startswith(f"{name}: ") and reason in str(err.value)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(FrameError, match=rf"^{tmp_path / 'gone.png'}: cannot read file"):
        read_image(tmp_path / "gone.png", 50_000_000, grey=False)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp", ".gif"])
def test_each_format_decodes_to_bgr_or_grey(ext):
    data = encoded(ext, colour_image())
    colour = decode_image(data, f"a{ext}", 50_000_000, grey=False)
    grey = decode_image(data, f"a{ext}", 50_000_000, grey=True)
    assert colour.shape == (48, 64, 3) and colour.dtype == np.uint8
    assert grey.shape == (48, 64) and grey.dtype == np.uint8
    # JPEG and WebP are lossy and GIF's palette rounds colours: near, not equal
    assert abs(int(colour[10, 50, 2]) - 200) < 24 and abs(int(colour[10, 10, 0]) - 100) < 24
    assert abs(int(grey[10, 50]) - 60) < 10  # 0.299 * 200


def test_16_bit_and_4_channel_files_come_out_as_8_bit():
    deep = np.full((20, 30, 3), 40000, np.uint16)
    rgba = np.dstack([colour_image(), np.full((48, 64), 128, np.uint8)])
    colour16 = decode_image(encoded(".png", deep), "deep.png", 50_000_000, grey=False)
    grey16 = decode_image(encoded(".png", deep), "deep.png", 50_000_000, grey=True)
    colour4 = decode_image(encoded(".png", rgba), "rgba.png", 50_000_000, grey=False)
    assert colour16.shape == (20, 30, 3) and colour16.dtype == np.uint8 and colour16[0, 0, 0] == 40000 >> 8
    assert grey16.shape == (20, 30) and grey16.dtype == np.uint8
    assert colour4.shape == (48, 64, 3) and tuple(colour4[0, 40]) == (0, 0, 200)


def test_a_grey_bmp_comes_out_as_bgr_unless_grey_is_asked():
    data = encoded(".bmp", np.full((20, 30), 77, np.uint8))
    assert decode_image(data, "g.bmp", 50_000_000, grey=False).shape == (20, 30, 3)
    grey = decode_image(data, "g.bmp", 50_000_000, grey=True)
    assert grey.shape == (20, 30) and int(grey.mean()) == 77
