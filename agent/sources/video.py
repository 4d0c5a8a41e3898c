"""``video``: a video file, frame by frame, to its end (a batch source)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from agent.frames import Frame
from agent.sources import SourceError, SourceSettings, plugin
from agent.sources.base import FrameSource
from engines.settings import ConfigPath


class VideoSettings(SourceSettings):
    kind: Literal["video"] = "video"
    path: ConfigPath | None = Field(None, description="the video file")
    fps: float = Field(0.0, ge=0.0, description="pacing; 0 = as fast as inference takes the frames")


class VideoSource(FrameSource):
    """A video file, frame by frame; ends at EOF. A file that will not open gives one error frame
    and sets ``failure``."""

    def __init__(self, cfg: VideoSettings) -> None:
        if cfg.path is None or not Path(cfg.path).is_file():
            raise SourceError(f"source.path: video file not found: {cfg.path}")
        super().__init__(cfg, name=f"video-{Path(cfg.path).stem}", live=False, fps=cfg.fps)
        self.path = Path(cfg.path)

    def _produce(self) -> None:
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                self.failure = f"{self.path}: cannot open video (corrupt or unsupported codec)"
                frame_id, seq = self._next_id()
                self._emit(Frame(frame_id, seq, self.name, None, meta={"path": str(self.path)}, error=self.failure))
                return
            self._stats.connected = True
            while self._pace():
                pos = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
                ok, img = cap.read()
                if not ok or img is None:
                    return  # EOF
                frame = self._captured(img, f"{self.path} frame {pos}", {"path": str(self.path), "pos": pos})
                if not self._emit(frame):
                    return
        finally:
            cap.release()



PLUGINS = [plugin("video", VideoSettings, "agent.sources.video", "a video file, frame by frame, to its end")]
SOURCE = VideoSource
