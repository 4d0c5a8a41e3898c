"""The verdict payload contract: real Verdict payloads validate, malformed ones are rejected."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from agent.verdict import ModelInfo, Region, Verdict

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "agent" / "verdict.schema.json"
MODEL = ModelInfo(id="bracket", version="2024-05-01.1", method="padim")


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def ok_verdict() -> Verdict:
    return Verdict(frame_id="cam1-000001", seq=1, source="cam1", timestamp=1714550000.25, status="ok",
                   model=MODEL, image_score=3.2, threshold=7.5, normalized_score=0.43,
                   timings_ms={"engine": 12.5, "total": 20.1})


def ng_verdict() -> Verdict:
    return Verdict(frame_id="cam1-000002", seq=2, source="cam1", timestamp=1714550000.5, status="ng",
                   model=MODEL, image_score=11.0, threshold=7.5, normalized_score=1.47,
                   regions=[Region(x=10, y=20, w=30, h=15, area=300, peak=14.2),
                            Region(x=200, y=5, w=4, h=4, area=9, peak=8.0)])


def error_verdict() -> Verdict:
    return Verdict(frame_id="cam1-000003", seq=3, source="cam1", timestamp=1714550001.0, status="error",
                   model=MODEL, error="unreadable image: cam1/000003.png")


def payload(v: Verdict) -> dict[str, Any]:
    return json.loads(v.to_json())  # what travels, not the Python dict


@pytest.mark.parametrize("make", [ok_verdict, ng_verdict, error_verdict])
def test_real_verdicts_validate(validator: Draft202012Validator, make: Any) -> None:
    validator.validate(payload(make()))


def test_schema_lists_exactly_the_verdict_fields(validator: Draft202012Validator) -> None:
    schema = validator.schema
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Verdict)}
    assert set(schema["properties"]["model"]["properties"]) == {f.name for f in dataclasses.fields(ModelInfo)}
    region = schema["properties"]["regions"]["items"]
    assert set(region["properties"]) == {f.name for f in dataclasses.fields(Region)}
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"field {name} has no description for integrators"


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    d = copy.deepcopy(d)
    del d[key]
    return d


def _with(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    target = d
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    target[last] = value
    return d


BAD = {
    "unknown field": lambda: _with(payload(ok_verdict()), "colour", "red"),
    "missing frame_id": lambda: _without(payload(ok_verdict()), "frame_id"),
    "empty frame_id": lambda: _with(payload(ok_verdict()), "frame_id", ""),
    "unknown status": lambda: _with(payload(ok_verdict()), "status", "maybe"),
    "score as string": lambda: _with(payload(ok_verdict()), "image_score", "3.2"),
    "ok without score": lambda: _with(payload(ok_verdict()), "image_score", None),
    "ng with error text": lambda: _with(payload(ng_verdict()), "error", "oops"),
    "error without reason": lambda: _with(payload(error_verdict()), "error", None),
    "negative seq": lambda: _with(payload(ok_verdict()), "seq", -1),
    "region missing peak": lambda: _with(payload(ng_verdict()), "regions", [{"x": 1, "y": 1, "w": 1, "h": 1, "area": 1}]),
    "region float coords": lambda: _with(payload(ng_verdict()), "regions.0.x", 1.5),
    "model extra field": lambda: _with(payload(ok_verdict()), "model.path", "/srv/models"),
    "timing not a number": lambda: _with(payload(ok_verdict()), "timings_ms.engine", "fast"),
    "other major version": lambda: _with(payload(ok_verdict()), "schema_version", "2.0"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_payloads_are_rejected(validator: Draft202012Validator, name: str) -> None:
    errors = list(validator.iter_errors(BAD[name]()))
    assert errors, f"{name}: accepted by the schema"
