"""The verdict record: one per frame, the payload contract with the PLC/SCADA layer; and the
inspection, the verdict with what it was judged on, as the sinks receive it.

Field names are stable; ``agent/verdict.schema.json`` is the JSON Schema that the tests
validate real payloads against. Bump ``SCHEMA_VERSION`` on any incompatible change.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from engines.decision import Region

SCHEMA_VERSION = "1.2"

Status = Literal["ok", "ng", "error"]


@dataclass
class ModelInfo:
    id: str
    version: str
    method: str

    @classmethod
    def of(cls, model_id: str, created: float, method: str) -> "ModelInfo":
        """A bundle's identity; its version is the calibration time (UTC), new at every recalibration."""
        return cls(id=model_id, version=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)), method=method)


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
    part_id: str | None = None                 # the PLC's part id, for a triggered frame
    part_meta: dict[str, Any] | None = None    # the trigger's metadata, as sent
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass
class Inspection:
    """A verdict and the evidence behind it, handed to every sink (MQTT, archive, page).

    ``image`` is the frame as inspected (HxWx3 BGR or HxW grey uint8) and ``score_map`` the
    pipeline's map at the frame's aspect (at most ``runtime.map_max_side`` long); both are None
    for a frame that could not be judged. Sinks only read them: the arrays are shared.
    """

    verdict: Verdict
    image: np.ndarray | None = None
    score_map: np.ndarray | None = None
