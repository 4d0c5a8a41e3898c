"""``stream``: an RTSP/HTTP/... stream through OpenCV's FFmpeg backend, reopened with backoff."""
from __future__ import annotations

import re
from typing import Literal

import cv2
from pydantic import Field

from agent.sources import SourceError, SourceSettings, plugin
from agent.sources.base import CaptureSource

# URL schemes handed to FFmpeg; anything else with " ! " in it is read as a GStreamer pipeline.
_FFMPEG_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


class StreamSettings(SourceSettings):
    kind: Literal["stream"] = "stream"
    url: str = Field("", description="rtsp://... or http://... (FFmpeg; PyPI OpenCV has no GStreamer)")
    open_timeout_s: float = Field(5.0, gt=0.0, description="open timeout")
    read_timeout_s: float = Field(5.0, gt=0.0, description="read timeout")


class StreamSource(CaptureSource):
    """An RTSP/HTTP/... stream through OpenCV's FFmpeg backend, with open and read timeouts.

    A GStreamer pipeline (text with `` ! `` in it) needs an OpenCV built with GStreamer; the
    PyPI wheels are built without it, which is detected here and refused with an explanation.
    """

    def __init__(self, cfg: StreamSettings) -> None:
        url = cfg.url.strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in _FFMPEG_SCHEMES:
            self.backend = cv2.CAP_FFMPEG
        elif " ! " in url:
            if not gstreamer_available():
                raise SourceError(
                    f"source.url: {url!r} is a GStreamer pipeline, but this OpenCV ({cv2.__version__}) was built "
                    "without GStreamer (cv2.getBuildInformation() says 'GStreamer: NO'; the PyPI "
                    "opencv-python wheels never include it). Use an rtsp:// or http:// URL, which OpenCV "
                    "reads through FFmpeg, or install an OpenCV built with GStreamer (e.g. the one "
                    "JetPack ships, or a source build with -DWITH_GSTREAMER=ON).")
            self.backend = cv2.CAP_GSTREAMER
        else:
            raise SourceError(f"source.url: expected a stream URL ({', '.join(s + '://' for s in _FFMPEG_SCHEMES)}) "
                              f"or a GStreamer pipeline, got {cfg.url!r}")
        super().__init__(cfg, name="stream")
        self.url = url

    def _stop_timeout(self) -> float:
        # A blocked open or read returns within its own timeout.
        return self.cfg.open_timeout_s + self.cfg.read_timeout_s + 1.0

    def _open(self) -> cv2.VideoCapture:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000)]
        return cv2.VideoCapture(self.url, self.backend, params)



def gstreamer_available() -> bool:
    """Whether this OpenCV build reads GStreamer pipelines (the Video I/O section of its build info)."""
    match = re.search(r"^\s*GStreamer:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return match is not None and match.group(1).upper() != "NO"




PLUGINS = [plugin("stream", StreamSettings, "agent.sources.stream", "an RTSP/HTTP stream through FFmpeg (live)")]
SOURCE = StreamSource
