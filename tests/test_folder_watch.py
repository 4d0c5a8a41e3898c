"""A watched folder through real files: settle, file versions and their ids, skipped paths, a
folder that goes away and comes back."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.frames import Frame
from agent.sources import open_source
from agent.sources.base import FrameSource
from conftest import source_settings

POLL_S = 0.02


def _png(level: int, shape: tuple[int, int] = (48, 64)) -> bytes:
    return cv2.imencode(".png", np.full((*shape, 3), level, np.uint8))[1].tobytes()


def _put(folder: Path, name: str, data: bytes) -> Path:
    """Write elsewhere, then rename into ``folder``: a complete file appears at once."""
    staging, target = folder.parent / f".staging-{name}", folder / name
    staging.write_bytes(data)
    os.replace(staging, target)
    return target


def _expected_id(path: Path) -> str:
    st = path.stat()
    h = hashlib.blake2s(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode(), digest_size=4).hexdigest()
    return f"{path.stem}-{h}"


def _next_frame(source: FrameSource, limit: float = 10.0) -> Frame:
    frame = source.get(timeout=limit)
    assert frame is not None, f"no frame within {limit} s (stats: {source.stats})"
    return frame


def _wait_for(condition: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def watch() -> Iterator[Callable[..., FrameSource]]:
    """Start a watching folder source (stopped at the end of the test)."""
    started: list[FrameSource] = []

    def start(folder: Path, **kw) -> FrameSource:
        source = open_source(source_settings(kind="folder", path=folder, watch=True, poll_s=POLL_S, **kw))
        source.start()
        started.append(source)
        return source

    yield start
    for source in started:
        source.stop()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_a_file_written_slowly_is_taken_once_when_complete(inbox, watch):
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)
    data = cv2.imencode(".png", image)[1].tobytes()
    source = watch(inbox, settle_s=1.5)
    with open(inbox / "slow.png", "wb") as f:
        for piece in np.array_split(np.frombuffer(data, np.uint8), 5):
            f.write(piece.tobytes())
            f.flush()
            # The writer pauses for several polls but far less than settle_s: nothing is taken yet.
            assert source.get(timeout=5 * POLL_S) is None
    frame = _next_frame(source)
    assert frame.error is None and np.array_equal(frame.image, image)
    assert source.get(timeout=0.5) is None  # taken once
    assert source.stats.frames == 1 and source.stats.errors == 0


def test_with_settle_0_a_renamed_file_is_taken_at_first_sight_with_its_version_id(inbox, watch):
    source = watch(inbox, settle_s=0)
    path = _put(inbox, "part.png", _png(40))
    frame = _next_frame(source, limit=5)
    assert frame.id == _expected_id(path) and frame.error is None and int(frame.image.mean()) == 40


def test_a_reused_name_gives_a_new_frame_with_a_new_id(inbox, watch):
    source = watch(inbox, settle_s=0)
    _put(inbox, "part.png", _png(40))
    first = _next_frame(source)
    path = _put(inbox, "part.png", _png(200))  # the same name, new content
    second = _next_frame(source)
    assert int(first.image.mean()) == 40 and int(second.image.mean()) == 200
    assert second.id != first.id and second.id == _expected_id(path)
    assert source.get(timeout=0.3) is None


def test_the_same_file_keeps_its_id_in_a_new_run(inbox, watch):
    path = _put(inbox, "part.png", _png(40))
    first_run = watch(inbox, settle_s=0)
    first = _next_frame(first_run)
    first_run.stop()
    second = _next_frame(watch(inbox, settle_s=0))
    assert first.id == second.id == _expected_id(path)


def test_a_file_that_left_and_came_back_is_read_again_with_the_same_id(inbox, watch, tmp_path):
    source = watch(inbox, settle_s=0)
    path = _put(inbox, "part.png", _png(40))
    first = _next_frame(source)
    os.rename(path, tmp_path / "part.png")  # a rename keeps inode and mtime
    _put(inbox, "other.png", _png(90))
    assert _next_frame(source).id.startswith("other-")  # a listing without part.png was seen: forgotten
    os.rename(tmp_path / "part.png", path)
    again = _next_frame(source)
    assert again.id == first.id and int(again.image.mean()) == 40


def test_loops_dangling_links_and_folders_are_skipped_and_logged_once_each(inbox, watch, caplog):
    caplog.set_level(logging.INFO, logger="agent.sources")
    os.symlink("loop.png", inbox / "loop.png")
    os.symlink(inbox / "nowhere.png", inbox / "dangling.png")
    (inbox / "folder.png").mkdir()
    _put(inbox, "a.png", _png(10))
    source = watch(inbox, settle_s=0)
    assert _next_frame(source).id.startswith("a-")
    for i in range(3):  # each new file needs a further listing, in which the skipped paths are seen again
        _put(inbox, f"b{i}.png", _png(20 + i))
        assert _next_frame(source).id.startswith(f"b{i}-")
    for name, why in [("loop.png", "symbolic link loop"), ("dangling.png", "dangling symbolic link"),
                      ("folder.png", "a directory")]:
        assert _messages(caplog, f"skipping {inbox / name}: ") == \
            [f"source {source.name}: skipping {inbox / name}: {why}"]
    assert source.stats.skipped == 3 and source.stats.errors == 0


def test_a_skipped_path_that_goes_and_comes_back_is_logged_again(inbox, watch, caplog):
    caplog.set_level(logging.INFO, logger="agent.sources")
    (inbox / "folder.png").mkdir()
    source = watch(inbox, settle_s=0)
    _wait_for(lambda: source.stats.skipped == 1)
    (inbox / "folder.png").rmdir()
    _put(inbox, "a.png", _png(10))
    _next_frame(source)  # a listing without the folder was seen
    (inbox / "folder.png").mkdir()
    _wait_for(lambda: source.stats.skipped == 2)
    assert len(_messages(caplog, "skipping")) == 2


def test_a_removed_folder_is_logged_once_and_the_source_recovers_when_it_returns(inbox, watch, caplog):
    caplog.set_level(logging.INFO, logger="agent.sources")
    _put(inbox, "a.png", _png(10))
    source = watch(inbox, settle_s=0)
    _next_frame(source)
    shutil.rmtree(inbox)
    _wait_for(lambda: source.stats.errors >= 3)  # listed again every poll
    assert len(_messages(caplog, "cannot list")) == 1
    assert not source.finished and source.stats.failures == 0

    inbox.mkdir()
    _put(inbox, "b.png", _png(90))
    frame = _next_frame(source)
    assert frame.id.startswith("b-") and int(frame.image.mean()) == 90
    assert len(_messages(caplog, "can be listed again")) == 1

    shutil.rmtree(inbox)  # a second episode is logged again
    _wait_for(lambda: len(_messages(caplog, "cannot list")) == 2)


def test_a_batch_folder_skips_and_counts_what_is_no_file(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((8, 8, 3), 10, np.uint8))
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    (tmp_path / "folder.png").mkdir()
    source = open_source(source_settings(kind="folder", path=tmp_path))
    source.start()
    frame = _next_frame(source)
    _wait_for(lambda: source.finished)
    assert frame.id == "a" and source.stats.skipped == 2 and source.failure is None


def test_a_batch_folder_that_cannot_be_listed_fails_the_batch(inbox):
    source = open_source(source_settings(kind="folder", path=inbox))
    inbox.rmdir()  # between the check at open and the listing at start
    source.start()
    _wait_for(lambda: source.finished)
    assert source.failure is not None and "FileNotFoundError" in source.failure and str(inbox) in source.failure
    assert source.stats.failures == 1
