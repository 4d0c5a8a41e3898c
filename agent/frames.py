"""The record that travels from a frame source to the pipeline."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Frame:
    """One image taken from a source.

    ``image`` is an HxW (grey) or HxWx3 (BGR, OpenCV order) uint8 array. A frame that
    could not be read still travels, with ``image=None`` and ``error`` set, so that it
    becomes an error verdict instead of silence.
    """

    id: str
    seq: int
    source: str
    image: np.ndarray | None
    t: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
