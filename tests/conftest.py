"""Shared fixtures: a real mosquitto broker on a free loopback port, small real filesystems (tmpfs), models."""
from __future__ import annotations

import errno
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_client import subscribers  # noqa: F401  (the fixture, for every test module)

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One mosquitto process; ``stop()`` and ``start()`` keep the port, config and persistence.

    Persistence is on (saved on stop), so a subscriber with a persistent session
    (clean_session=False, QoS 1) gets what was published while it reconnected after a restart.
    """

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            # Started as root, mosquitto would switch to user 'mosquitto', who cannot read tmp_path.
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            + (extra_config if "allow_anonymous" in extra_config else "allow_anonymous true\n" + extra_config))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        assert self._proc is None, "broker already running"
        self._proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}\n{self._log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s} s\n"
                           f"{self._log_tail()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Crash the broker (SIGKILL): nothing is saved, unread socket data is lost."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


# Agent processes started by tests: whatever a failing test leaves running is killed after it.
AGENTS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_agent_outlives_its_test() -> Iterator[None]:
    yield
    while AGENTS:
        proc = AGENTS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers with extra config lines; all are stopped at the end of the test."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    brokers: list[Mosquitto] = []

    def make(extra_config: str = "") -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(brokers)}", extra_config)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A running anonymous broker: ``host``, ``port``, ``stop()``, ``start()`` on the same port."""
    return mosquitto_factory()


# --- calibrated models on synthetic data (no ../shared needed) -----------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def small_model_config(method: str | dict = "padim", **overrides: object):
    """A fast configuration for tests: 128 px input, few PaDiM channels; ``method`` a name or settings."""
    from calibration.settings import ModelConfig

    cfg = ModelConfig(method={"kind": "padim", "dims": 48} if method == "padim" else method,
                      input_size=[128, 128], batch_size=8)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module that trains many tiny batches: on a shared, oversubscribed
    CPU more threads only spin (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calibration.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("sample") / "part", n_train=24, n_test_good=6,
                         n_test_defect=4, size=(160, 192), seed=1)


@pytest.fixture(scope="session")
def padim_bundle(sample_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from calibration.calibrate import calibrate

    return calibrate(sample_data, tmp_path_factory.mktemp("bundles") / "padim", small_model_config(), progress=False)


def pipeline(bundle, backend: str = "torch", use_mask: bool = True, **runtime: object):
    """The frame path on one named backend (CPU, one engine call per frame unless told)."""
    from engines.pipeline import Pipeline
    from engines.runtimes import RuntimeSettings, open_backend

    settings = RuntimeSettings.model_validate({"backend": backend, "device": "cpu", "fallback": False, **runtime})
    return Pipeline(bundle, open_backend(bundle, settings)[0], settings, use_mask=use_mask)


def assert_runtime_parity(bundle, images: list, backend: str, rtol: float, **runtime: object) -> None:
    """``backend`` scores ``images`` as the torch reference does: image scores within ``rtol``, maps within
    ``rtol`` relative to the largest score (near-zero map values carry no relative meaning)."""
    import numpy as np

    r, o = pipeline(bundle, "torch").score(images), pipeline(bundle, backend, **runtime).score(images)
    ref_scores = np.array([f.score for f in r])
    assert np.all(np.isfinite(ref_scores)) and ref_scores.max() > 0
    np.testing.assert_allclose([f.score for f in o], ref_scores, rtol=rtol)
    for a, b in zip(r, o):
        assert a.map.shape == b.map.shape == images[0].shape[:2]
        np.testing.assert_allclose(b.map, a.map, rtol=rtol, atol=rtol * ref_scores.max())


def source_settings(**values: object):
    """The typed settings of a source kind, e.g. ``source_settings(kind="folder", path=p)``."""
    from agent.sources import SOURCES

    return SOURCES.get(str(values["kind"])).settings(**values)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount real small filesystems (tmpfs) the test can fill or make read-only: ``tmpfs(name, "size=1m")``.
    Skipped where mounting is not permitted (it needs root); unmounted lazily after the test, since a
    failed test's agent may still hold files open there."""
    if os.geteuid() != 0:
        pytest.skip("a real full or read-only filesystem needs a tmpfs, and mounting one needs root")
    mounted: list[Path] = []

    def mount(name: str, options: str = "size=1m") -> Path:
        path = tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    """Change a mounted tmpfs's options, e.g. ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; unlink it to give the space back."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler
