"""systemd service notifications (sd_notify) without a libsystemd dependency.

The unit runs with ``Type=notify`` and ``WatchdogSec=``: the agent sends ``READY=1`` once
the engine is warm, ``WATCHDOG=1`` from the inference loop (so a hung GPU stops the pings
and systemd restarts the service), and ``STOPPING=1`` on SIGTERM. Outside systemd
(``NOTIFY_SOCKET`` unset) every call is a no-op returning False, so the same code runs
from a shell or a test.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send one sd_notify datagram (e.g. ``"READY=1"``); True when it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # Linux abstract namespace: the leading '@' stands for a NUL byte.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        # Never let a notification failure stop inspection; systemd will notice on its own.
        log.warning("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """The service is up (engine warm); optional one-line status for ``systemctl status``."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def watchdog() -> bool:
    """Keep-alive ping; call from the loop that must not hang."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval_s() -> float | None:
    """How often to call ``watchdog()``: half of ``WatchdogSec`` as systemd recommends.

    None when the watchdog is off, or when it is meant for another process
    (``WATCHDOG_PID`` names a different pid).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        period = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog pings disabled", usec)
        return None
    return period / 1e6 / 2 if period > 0 else None


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the notify protocol.
    return " ".join(text.splitlines())
