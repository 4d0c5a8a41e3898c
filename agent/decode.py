"""Guarded image decoding: a file is refused before decoding when it cannot be a frame we accept.

A decompression bomb is a file of a few dozen bytes whose header claims a huge image; decoding
it would allocate gigabytes or raise from inside OpenCV. So, in order, cheapest first:

1. an empty file is refused;
2. a file larger than any image within ``max_pixels`` could be (8 bytes per pixel, 16-bit
   RGBA stored raw, plus a margin for headers and metadata) is refused unread;
3. the header alone is read with Pillow's lazy ``Image.open`` (no pixel is decoded): a format
   OpenCV cannot decode, or a header that does not parse, is refused, and so is a width x
   height above ``max_pixels``. Pillow applies its own decompression-bomb limit at the same
   step (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels); a file above it is refused
   with Pillow's words, whatever ``max_pixels`` says;
4. OpenCV decodes; its failure (None or ``cv2.error``) is refused too.

Every refusal is a ``FrameError`` whose message starts with the file's name and says what is
wrong. The image comes back as OpenCV's ``IMREAD_COLOR``/``IMREAD_GRAYSCALE`` give it: 8-bit
HxWx3 BGR, or 8-bit HxW grey, whatever the file's depth and channels.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["FrameError", "decode_image", "max_file_bytes", "oversize", "read_image"]

# Pillow names of the formats OpenCV decodes; anything else Pillow knows (PSD, ICO, ...) would
# pass the header check and then fail in OpenCV with a less helpful message.
_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000", "SUN")
_BYTES_PER_PIXEL = 8
_METADATA_MARGIN = 1 << 20  # EXIF, ICC profiles, XMP and thumbnails


class FrameError(ValueError):
    """A frame that will not be delivered; the message names the file (or source) and the reason."""


def max_file_bytes(max_pixels: int) -> int:
    """The largest file that can hold an image of at most ``max_pixels`` pixels."""
    return max_pixels * _BYTES_PER_PIXEL + _METADATA_MARGIN


def oversize(width: int, height: int, max_pixels: int) -> str | None:
    """Why a ``width`` x ``height`` frame is too large, or None when it is within ``max_pixels``."""
    if width * height <= max_pixels:
        return None
    return f"{width} x {height} = {width * height} pixels, more than source.max_pixels {max_pixels}"


def read_image(path: Path, max_pixels: int, grey: bool) -> np.ndarray:
    """``decode_image`` on a file; a file too large to be a frame is refused before it is read."""
    try:
        with open(path, "rb") as f:
            _check_size(os.fstat(f.fileno()).st_size, str(path), max_pixels)
            data = f.read(max_file_bytes(max_pixels) + 1)  # bounded: the file may grow meanwhile
    except OSError as e:
        raise FrameError(f"{path}: cannot read file: {e.strerror or e}") from e
    return decode_image(data, str(path), max_pixels, grey)


def decode_image(data: bytes, name: str, max_pixels: int, grey: bool) -> np.ndarray:
    """The image in ``data`` (HxWx3 BGR uint8, or HxW uint8 when ``grey``); raises FrameError."""
    if not data:
        raise FrameError(f"{name}: empty file")
    _check_size(len(data), name, max_pixels)
    width, height = _header_size(data, name)
    too_large = oversize(width, height, max_pixels)
    if too_large is not None:
        raise FrameError(f"{name}: header says {too_large}")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise FrameError(f"{name}: cannot decode ({e.err})") from e
    if image is None:
        raise FrameError(f"{name}: cannot decode (corrupt or truncated)")
    return image


def _check_size(size: int, name: str, max_pixels: int) -> None:
    limit = max_file_bytes(max_pixels)
    if size > limit:
        raise FrameError(f"{name}: file is {size} bytes, more than any image within source.max_pixels "
                         f"{max_pixels} can be ({limit} bytes)")


def _header_size(data: bytes, name: str) -> tuple[int, int]:
    """Width and height from the header; Pillow's open reads no pixel data."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise FrameError(f"{name}: header refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise FrameError(f"{name}: unsupported format or corrupt header "
                         f"(expected one of {', '.join(_FORMATS)})") from e
    except Exception as e:  # a parser of untrusted bytes: whatever it raises means a bad header
        raise FrameError(f"{name}: corrupt or truncated header ({type(e).__name__}: {e})") from e
