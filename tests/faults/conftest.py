"""The fault matrix: every test runs the real ``run`` command against a real Mosquitto."""
from __future__ import annotations

from mqtt_client import subscribers  # noqa: F401  (fixture)
