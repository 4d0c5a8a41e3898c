"""``camera``: a V4L2 camera by index (/dev/video<index>), reopened with backoff when lost."""
from __future__ import annotations

from typing import Literal

import cv2
from pydantic import Field

from agent.sources import SourceSettings, plugin
from agent.sources.base import CaptureSource


class CameraSettings(SourceSettings):
    kind: Literal["camera"] = "camera"
    index: int = Field(0, ge=0, description="V4L2 index (/dev/videoN)")


class CameraSource(CaptureSource):
    def __init__(self, cfg: CameraSettings) -> None:
        super().__init__(cfg, name=f"camera{cfg.index}")

    def _open(self) -> cv2.VideoCapture:
        return cv2.VideoCapture(self.cfg.index, cv2.CAP_V4L2)


PLUGINS = [plugin("camera", CameraSettings, "agent.sources.camera", "a V4L2 camera (live)")]
SOURCE = CameraSource
