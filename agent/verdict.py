"""The verdict record: one per frame, the payload contract with the PLC/SCADA layer.

Field names are stable; ``agent/verdict.schema.json`` is the JSON Schema that the tests
validate real payloads against. Bump ``SCHEMA_VERSION`` on any incompatible change.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from engines.decision import Region

SCHEMA_VERSION = "1.1"

Status = Literal["ok", "ng", "error"]


@dataclass
class ModelInfo:
    id: str
    version: str
    method: str


@dataclass
class Verdict:
    frame_id: str
    seq: int
    source: str
    timestamp: float
    status: Status
    model: ModelInfo
    image_score: float | None = None
    threshold: float | None = None
    normalized_score: float | None = None
    pixel_threshold: float | None = None
    regions: list[Region] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))
