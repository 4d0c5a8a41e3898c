"""docs/integration.md and docs/node-red-flow.json say what the code does (the ACL file itself is
exercised by test_plc.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from agent.commands import COMMANDS
from agent.sparkplug import DEVICE_METRICS, NODE_METRICS

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGE = (DOCS / "integration.md").read_text()


def test_the_page_names_every_sparkplug_metric_and_command() -> None:
    named = set(re.findall(r"`((?:Verdict|Counts|Performance|Model)/[^`]+)`", PAGE))
    assert named == set(DEVICE_METRICS), (set(DEVICE_METRICS) - named, named - set(DEVICE_METRICS))
    for name in NODE_METRICS:
        assert f"`{name}`" in PAGE
    for command in ("trigger", *COMMANDS):
        assert f"<prefix>/cmd/{command}" in PAGE or f"`<prefix>/cmd/{command}`" in PAGE


def test_the_node_red_flow_is_wired_to_the_agents_topics() -> None:
    flow = json.loads((DOCS / "node-red-flow.json").read_text())
    ids = [node["id"] for node in flow]
    assert len(ids) == len(set(ids))
    for node in flow:
        for outputs in node.get("wires", []):
            assert set(outputs) <= set(ids), node["id"]
        if node["type"] in ("mqtt in", "mqtt out"):
            assert node["broker"] in ids
    topics = {node["topic"] for node in flow if node["type"] in ("mqtt in", "mqtt out")}
    prefix = "plant/line7"
    assert {f"{prefix}/cmd/trigger", f"{prefix}/cmd/pause", f"{prefix}/cmd/resume", f"{prefix}/last_result",
            f"{prefix}/heartbeat"} <= topics
    (request,) = [node for node in flow if node["type"] == "change"]
    reply_to = next(rule["to"] for rule in request["rules"] if rule["p"] == "responseTopic")
    assert reply_to in topics  # the answers come back to the flow
