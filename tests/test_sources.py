"""Frame sources through real OpenCV: files, a video, an HTTP MJPEG stream, a missing camera."""
from __future__ import annotations

import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.frames import Frame
from agent.sources import SourceError, SourceSettings, open_source
from agent.sources.base import BOOT_ID
from agent.sources.stream import gstreamer_available
from agent.sources.synthetic import SyntheticSource
from conftest import source_settings
from calibration.synthetic import DEFECT_KINDS
from test_decode import png_header_only


def _level_image(level: int, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    return np.full((*shape, 3), level, np.uint8)


def _drain(source, limit: float = 10.0) -> list[Frame]:
    """Every frame until the source is finished (fails the test if it never finishes)."""
    frames, deadline = [], time.monotonic() + limit
    while not source.finished:
        assert time.monotonic() < deadline, "source did not finish"
        frame = source.get(timeout=0.5)
        if frame is not None:
            frames.append(frame)
    return frames


def _wait_for(condition, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# -- folder --------------------------------------------------------------------------------

def test_folder_batch_gives_every_file_in_name_order_then_finishes(tmp_path):
    for i, name in enumerate(["p_03", "p_01", "p_02", "p_10"]):
        cv2.imwrite(str(tmp_path / f"{name}.png"), _level_image(20 * (i + 1)))
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(source_settings(kind="folder", path=tmp_path))
    source.start()
    frames = _drain(source)
    source.stop()
    assert [f.id for f in frames] == ["p_01", "p_02", "p_03", "p_10"]
    assert [f.seq for f in frames] == [0, 1, 2, 3]
    assert [int(f.image.mean()) for f in frames] == [40, 60, 20, 80]
    assert all(f.image.shape == (48, 64, 3) and f.error is None for f in frames)
    assert frames[0].meta["path"] == str(tmp_path / "p_01.png")
    assert source.stats.frames == 4 and source.stats.errors == 0
    assert source.failure is None  # read to its end


def test_folder_reads_grey_when_asked_and_keeps_colour_by_default(tmp_path):
    img = _level_image(0)
    img[..., 2] = 200  # red
    cv2.imwrite(str(tmp_path / "red.png"), img)
    colour = open_source(source_settings(kind="folder", path=tmp_path))
    grey = open_source(source_settings(kind="folder", path=tmp_path, grey=True))
    colour.start()
    grey.start()
    (c,), (g,) = _drain(colour), _drain(grey)
    assert c.image.shape == (48, 64, 3) and tuple(c.image[0, 0]) == (0, 0, 200)
    assert g.image.shape == (48, 64) and 50 < g.image[0, 0] < 70  # 0.299 * 200


def test_folder_ids_get_a_counter_when_stems_collide(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _level_image(10))
    cv2.imwrite(str(tmp_path / "a.jpg"), _level_image(10))
    cv2.imwrite(str(tmp_path / "a-2.png"), _level_image(10))
    source = open_source(source_settings(kind="folder", path=tmp_path))
    source.start()
    ids = [f.id for f in _drain(source)]
    assert len(set(ids)) == 3 and set(ids) <= {"a", "a-2", "a-3"}


def test_folder_pattern_selects_files(tmp_path):
    for name in ["cam1_001.png", "cam2_001.png", "cam1_002.png"]:
        cv2.imwrite(str(tmp_path / name), _level_image(10))
    source = open_source(source_settings(kind="folder", path=tmp_path, pattern="cam1_*.png"))
    source.start()
    assert [f.id for f in _drain(source)] == ["cam1_001", "cam1_002"]


def test_corrupt_and_empty_files_become_error_frames_and_the_rest_still_come(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), _level_image(10))
    (tmp_path / "b.png").write_bytes(b"\x89PNG this is not really a png" * 10)
    (tmp_path / "c.jpg").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "d.png"), _level_image(30))
    source = open_source(source_settings(kind="folder", path=tmp_path))
    source.start()
    frames = _drain(source)
    assert [f.id for f in frames] == ["a", "b", "c", "d"]
    assert frames[0].error is None and frames[3].error is None and int(frames[3].image.mean()) == 30
    for frame, name in [(frames[1], "b.png"), (frames[2], "c.jpg")]:
        assert frame.image is None
        assert str(tmp_path / name) in frame.error
    assert source.stats.errors == 2 and source.stats.frames == 4


def test_watch_mode_picks_up_files_written_after_start_once_each(tmp_path):
    cv2.imwrite(str(tmp_path / "first.png"), _level_image(10))
    source = open_source(source_settings(kind="folder", path=tmp_path, watch=True, poll_s=0.05))
    source.start()
    try:
        first = source.get(timeout=5)
        assert first is not None and re.fullmatch(r"first-[0-9a-f]{8}", first.id)
        assert source.get(timeout=0.3) is None  # nothing new: nothing read twice
        cv2.imwrite(str(tmp_path / "second.png"), _level_image(90))
        second = source.get(timeout=5)
        assert second is not None and second.id.startswith("second-") and int(second.image.mean()) == 90
        assert source.get(timeout=0.3) is None
        assert not source.finished  # watching goes on
    finally:
        source.stop()
    assert source.finished


def _bad_and_odd_files(folder: Path) -> dict[str, str | None]:
    """Write one file of each kind; name -> the reason its frame gives, None for a decoded image."""
    colour = _level_image(90)
    files = {
        "a_bomb.png": (png_header_only(100_000, 100_000), "decompression bomb"),
        "b_cut.jpg": (cv2.imencode(".jpg", colour)[1].tobytes()[:300], "corrupt or truncated"),
        "c_empty.png": (b"", "empty file"),
        "d_text.png": (b"a text file, not an image\n", "unsupported format or corrupt header"),
        "e_deep.png": (cv2.imencode(".png", np.full((48, 64, 3), 90 * 257, np.uint16))[1].tobytes(), None),
        "f_grey.bmp": (cv2.imencode(".bmp", np.full((48, 64), 90, np.uint8))[1].tobytes(), None),
        "g_page.tiff": (cv2.imencode(".tiff", colour)[1].tobytes(), None),
        "h_web.webp": (cv2.imencode(".webp", colour)[1].tobytes(), None),
        "i_anim.gif": (cv2.imencode(".gif", colour)[1].tobytes(), None),
        "j_last.png": (cv2.imencode(".png", colour)[1].tobytes(), None),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


@pytest.mark.parametrize("watch", [False, True])
def test_every_bad_or_odd_file_gives_exactly_one_frame_and_the_stream_goes_on(tmp_path, watch):
    expected = _bad_and_odd_files(tmp_path)
    source = open_source(source_settings(kind="folder", path=tmp_path, pattern="*", watch=watch, poll_s=0.05,
                                      settle_s=0))
    source.start()
    try:
        frames = [source.get(timeout=10) for _ in expected]
        assert source.get(timeout=0.3) is None  # one frame per file, no more
        if watch:
            assert not source.finished  # a watched folder goes on
        else:
            _wait_for(lambda: source.finished)
    finally:
        source.stop()
    assert [Path(f.meta["path"]).name for f in frames] == list(expected)
    for frame, (name, reason) in zip(frames, expected.items()):
        if reason is None:
            assert frame.error is None and frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
            assert abs(int(frame.image.mean()) - 90) < 8, name
        else:
            assert frame.image is None and frame.error.startswith(f"{tmp_path / name}: ") and reason in frame.error
    stats = source.stats
    assert stats.frames == 10 and stats.errors == 4 and stats.failures == 0 and source.failure is None


def test_missing_folder_is_refused_naming_the_path(tmp_path):
    with pytest.raises(SourceError, match="nowhere"):
        open_source(source_settings(kind="folder", path=tmp_path / "nowhere"))


# -- video file ----------------------------------------------------------------------------

def _write_video(path: Path, levels: list[int]) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for level in levels:
        writer.write(_level_image(level))
    writer.release()


def test_video_file_gives_every_frame_then_finishes(tmp_path):
    path = tmp_path / "clip.avi"
    levels = [20 * i + 10 for i in range(12)]
    _write_video(path, levels)
    source = open_source(source_settings(kind="video", path=path))
    source.start()
    frames = _drain(source)
    assert source.failure is None
    assert [f.seq for f in frames] == list(range(12))
    assert [f.meta["pos"] for f in frames] == list(range(12))
    assert np.allclose([f.image.mean() for f in frames], levels, atol=4)  # JPEG is lossy
    assert all(f.id == f"video-clip-{BOOT_ID}-{f.seq:08d}" for f in frames)


def test_unreadable_video_gives_an_error_frame_naming_it_and_fails_the_batch(tmp_path):
    path = tmp_path / "broken.avi"
    path.write_bytes(b"RIFF not a video at all" * 20)
    source = open_source(source_settings(kind="video", path=path))
    source.start()
    (frame,) = _drain(source)
    assert frame.image is None and str(path) in frame.error
    assert source.failure == frame.error


def test_video_frames_over_max_pixels_become_error_frames(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path, [50] * 5)
    source = open_source(source_settings(kind="video", path=path, max_pixels=2048))
    source.start()
    frames = _drain(source)
    assert [f.error for f in frames] == [f"{path} frame {i}: frame is 64 x 48 = 3072 pixels, more than "
                                         f"source.max_pixels 2048" for i in range(5)]
    assert all(f.image is None for f in frames)
    assert source.stats.errors == 5 and source.failure is None


# -- delivery modes ------------------------------------------------------------------------

def _synthetic(**kw) -> SourceSettings:
    return source_settings(kind="synthetic", size=[48, 48], defect_rate=0.5, **kw)


def test_triggered_mode_blocks_the_producer_and_drops_nothing():
    source = open_source(_synthetic(count=25, mode="triggered", queue_size=2))
    source.start()
    time.sleep(0.3)  # nobody consumes: the producer must be held at the full queue
    assert source.stats.frames <= 3  # two queued plus the one waiting to go in
    frames = []
    while not source.finished:
        frame = source.get(timeout=2)
        if frame is not None:
            frames.append(frame)
            time.sleep(0.01)  # a slow consumer
    assert [f.seq for f in frames] == list(range(25))
    assert source.stats.dropped == 0 and source.stats.frames == 25


def test_free_mode_keeps_the_newest_frame_and_counts_drops():
    source = open_source(_synthetic(count=60, mode="free", queue_size=8))
    source.start()
    received = []
    while not source.finished:
        frame = source.get(timeout=2)
        if frame is not None:
            received.append(frame.seq)
            time.sleep(0.05)  # far slower than the producer
    stats = source.stats
    assert received == sorted(received) and received[-1] == 59  # the newest survives
    assert stats.frames == 60 and stats.dropped > 0
    assert stats.dropped + len(received) == 60


def test_stop_releases_a_producer_blocked_on_a_full_queue():
    source = open_source(_synthetic(count=0, mode="triggered", queue_size=1))
    source.start()
    _wait_for(lambda: source.stats.frames >= 1)
    source.stop(timeout=5)
    assert source.get(timeout=1) is not None  # what was queued can still be taken
    _wait_for(lambda: source.finished, limit=5)


def test_take_queued_hands_over_what_is_left_after_stop_without_waiting():
    source = open_source(_synthetic(count=0, mode="triggered", queue_size=3))
    source.start()
    _wait_for(lambda: source.stats.frames >= 4)  # three queued, the fourth held at the full queue
    source.stop(timeout=5)
    # The fourth was captured too: a part that passed the camera is drained, not lost.
    assert [f.seq for f in source.take_queued()] == [0, 1, 2, 3]
    assert source.take_queued() == [] and source.finished and source.stats.frames == 4


# -- live and batch ------------------------------------------------------------------------

class FaultySynthetic(SyntheticSource):
    """Fault injection: the producer raises on its first three starts, then, on the fourth,
    after three frames; from the fifth start on it runs."""

    def __init__(self, cfg: SourceSettings) -> None:
        super().__init__(cfg)
        self.starts = 0

    def _produce(self) -> None:
        self.starts += 1
        if self.starts <= 3:
            raise RuntimeError(f"injected fault at start {self.starts}")
        super()._produce()

    def _pace(self) -> bool:  # called before each frame is captured
        if self.starts == 4 and self._stats.frames == 3:
            raise RuntimeError("injected fault after 3 frames")
        return super()._pace()


def test_a_live_source_whose_producer_raises_is_restarted_with_backoff_and_counted(caplog):
    caplog.set_level(logging.INFO, logger="agent.sources")
    source = FaultySynthetic(_synthetic(count=0, reconnect_min_s=0.01, reconnect_max_s=0.03))
    assert source.live
    source.start()
    try:
        seqs = [f.seq for f in (source.get(timeout=10) for _ in range(10))]
        assert seqs == list(range(10))  # frames go on after every restart
        assert not source.finished
    finally:
        source.stop()
    failures = [r for r in caplog.records if "restarting in" in r.getMessage()]
    assert source.stats.failures == len(failures) == 4
    # Two episodes (a frame came through between them): a traceback at the start of each, then one
    # line per repeat; the backoff doubles within an episode, up to its maximum, and starts over.
    assert [r.exc_info is not None for r in failures] == [True, False, False, True]
    assert [r.getMessage().split("restarting in ")[1] for r in failures] == ["0.01 s", "0.02 s", "0.03 s", "0.01 s"]
    assert "injected fault after 3 frames" in failures[3].getMessage()
    assert source.failure is None


class BrokenBatch(SyntheticSource):
    """Fault injection: the producer raises at the third frame."""

    def _emit(self, frame: Frame) -> bool:
        if frame.seq == 2:
            raise RuntimeError("injected fault")
        return super()._emit(frame)


def test_a_batch_source_whose_producer_raises_ends_with_the_failure_set():
    source = BrokenBatch(_synthetic(count=5))
    assert not source.live
    source.start()
    assert [f.seq for f in _drain(source)] == [0, 1]
    assert source.failure == "capture failed: RuntimeError: injected fault"
    assert source.stats.failures == 1


# -- synthetic -----------------------------------------------------------------------------

def test_synthetic_source_gives_count_frames_with_true_masks():
    source = open_source(_synthetic(count=12, seed=3))
    source.start()
    frames = _drain(source)
    assert [f.seq for f in frames] == list(range(12))
    assert len({f.id for f in frames}) == 12
    for f in frames:
        assert f.image.shape == (48, 48, 3)
        mask = f.meta["mask"]
        assert mask.shape == (48, 48) and mask.dtype == bool
        assert f.meta["defect"] in (None, *DEFECT_KINDS)
        assert mask.any() == (f.meta["defect"] is not None)
    assert any(f.meta["defect"] for f in frames) and not all(f.meta["defect"] for f in frames)



def test_synthetic_source_repeats_its_distinct_parts_in_turn():
    source = open_source(_synthetic(count=10, seed=3, distinct=4))
    source.start()
    frames = _drain(source)
    assert [f.seq for f in frames] == list(range(10)) and len({f.id for f in frames}) == 10
    for f in frames[4:]:
        first = frames[f.seq % 4]
        assert (f.image == first.image).all() and (f.meta["mask"] == first.meta["mask"]).all()
        assert f.image is not first.image                                 # each frame its own array
    assert not (frames[0].image == frames[1].image).all()


# -- stream --------------------------------------------------------------------------------

class MjpegServer:
    """A real HTTP MJPEG server (multipart/x-mixed-replace) on a loopback port that can be
    stopped, taking its open connections down with it, and started again on the same port."""

    def __init__(self) -> None:
        self.level = 50
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        stopped = self._stopped = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not stopped.is_set():
                        jpeg = cv2.imencode(".jpg", _level_image(owner.level))[1].tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                         b"Content-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg))
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()  # the streaming handlers return and their connections close
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"


def _frame_with_level(source, level: int, limit: float = 10.0) -> Frame:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        frame = source.get(timeout=0.5)
        if frame is not None and abs(frame.image.mean() - level) < 5:
            return frame
    raise AssertionError(f"no frame of level {level} within {limit} s (stats: {source.stats})")


def test_stream_reconnects_after_the_server_goes_away_and_comes_back():
    server = MjpegServer()
    server.start()
    cfg = source_settings(kind="stream", url=server.url, mode="free", open_timeout_s=2, read_timeout_s=2,
                       reconnect_min_s=0.05, reconnect_max_s=0.2)
    source = open_source(cfg)
    source.start()
    try:
        before = _frame_with_level(source, 50)
        assert before.image.shape == (48, 64, 3) and source.stats.connected

        server.stop()
        _wait_for(lambda: not source.stats.connected)
        _wait_for(lambda: source.stats.errors >= 2)  # the lost read and at least one refused reopen
        assert source.stats.reconnects == 0

        server.level = 200  # frames from the new server are told apart by their brightness
        server.start()
        after = _frame_with_level(source, 200)
        assert after.seq > before.seq and after.id != before.id
        assert source.stats.reconnects >= 1 and source.stats.connected
    finally:
        source.stop()
        server.stop()


def test_stream_frames_over_max_pixels_become_error_frames():
    server = MjpegServer()
    server.start()
    source = open_source(source_settings(kind="stream", url=server.url, max_pixels=2048, open_timeout_s=2,
                                      read_timeout_s=2))
    source.start()
    try:
        frame = source.get(timeout=10)
    finally:
        source.stop()
        server.stop()
    assert frame is not None and frame.image is None
    assert frame.error == "stream: frame is 64 x 48 = 3072 pixels, more than source.max_pixels 2048"


def test_gstreamer_pipeline_is_refused_with_an_explanation():
    if gstreamer_available():
        pytest.skip("this OpenCV build has GStreamer, so the pipeline is accepted")
    cfg = source_settings(kind="stream", url="videotestsrc ! videoconvert ! appsink")
    with pytest.raises(SourceError, match="GStreamer") as err:
        open_source(cfg)
    assert "without GStreamer" in str(err.value) and "rtsp://" in str(err.value)


def test_stream_url_that_is_neither_a_url_nor_a_pipeline_is_refused():
    with pytest.raises(SourceError, match="source.url.*'camera-1'"):
        open_source(source_settings(kind="stream", url="camera-1"))


# -- camera --------------------------------------------------------------------------------

def test_missing_camera_keeps_retrying_without_raising():
    if Path("/dev/video99").exists():
        pytest.skip("/dev/video99 exists here")
    source = open_source(source_settings(kind="camera", index=99, reconnect_min_s=0.02, reconnect_max_s=0.05))
    source.start()
    _wait_for(lambda: source.stats.errors >= 3)  # several failed opens, still trying
    assert not source.finished and not source.stats.connected
    assert source.get(timeout=0.1) is None
    source.stop()
    assert source.finished


# -- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("queue_size", 0), ("defect_rate", 1.5), ("reconnect_max_s", 0.1),
                                          ("size", [16, 16])])
def test_config_mistakes_name_the_key(field, value):
    from pydantic import ValidationError

    from agent.config import Config, describe

    with pytest.raises(ValidationError) as e:
        Config.model_validate({"source": {field: value}})
    assert describe(e.value, "f.yaml").startswith(f"f.yaml: source.{field}: expected")
