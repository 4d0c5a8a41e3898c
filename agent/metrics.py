"""``/metrics``: the agent's figures in the Prometheus text format (prometheus_client).

The figures are the page's and the health message's: the collector reads them at scrape time
(``Health.figures`` and the service's status), so a scrape costs the inspection loop nothing
and every figure of one scrape comes from the same moment. Names start with ``inspection_``;
counters end in ``_total``, and stage latencies are a histogram in seconds per stage.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.health import STAGE_BUCKETS_S, Health

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the format generate_latest writes

# (section of the status, key, metric name, help); counters get "_total" from prometheus_client.
_COUNTERS = [
    ("source", "frames", "inspection_source_frames", "Frames captured by the source, error frames included"),
    ("source", "dropped", "inspection_source_dropped", "Frames a free-running source replaced before inspection"),
    ("source", "errors", "inspection_source_errors", "Error frames, failed opens and reads of the source"),
    ("source", "failures", "inspection_source_failures", "Restarts of a live source after a failure"),
    ("mqtt", "sent", "inspection_mqtt_sent", "Messages handed to the broker from the spool, replays included"),
    ("mqtt", "acked", "inspection_mqtt_acked", "Messages acknowledged by the broker"),
    ("mqtt", "dropped", "inspection_mqtt_dropped", "Messages dropped by the full spool"),
    ("mqtt", "rejected", "inspection_mqtt_rejected", "Messages refused by the broker"),
    ("mqtt", "direct", "inspection_mqtt_direct", "Verdicts published around a spool that could not be written"),
    ("mqtt", "lost", "inspection_mqtt_lost", "Verdicts neither spooled nor published"),
    ("mqtt", "spool_errors", "inspection_spool_errors", "Spool writes that failed"),
    ("mqtt", "spool_quarantined", "inspection_spool_quarantined", "Damaged spool files moved aside"),
    ("archive", "written", "inspection_archive_written", "Records written to the archive"),
    ("archive", "dropped", "inspection_archive_dropped", "Records dropped: the archive writer was behind"),
    ("archive", "failed", "inspection_archive_failed", "Records that could not be written (disk full, read-only)"),
    ("archive", "deleted", "inspection_archive_deleted", "Records deleted by the archive's retention"),
]
_GAUGES = [
    ("source", "connected", "inspection_source_connected", "1 while the source is open"),
    ("mqtt", "connected", "inspection_mqtt_connected", "1 while connected to the broker"),
    ("mqtt", "spooled", "inspection_spool_messages", "Messages waiting in the spool"),
    ("mqtt", "held", "inspection_mqtt_held", "Verdicts waiting in memory (spool failing, broker away)"),
    ("archive", "queued", "inspection_archive_queued", "Records waiting for the archive writer"),
    ("archive", "bytes", "inspection_archive_bytes", "Size of the archive"),
]
_MQTT_STATES = ("connecting", "connected", "disconnected", "refused")


class Metrics(Collector):
    """A registry with one collector that reads ``health`` and ``status()`` when scraped."""

    def __init__(self, health: Health, status: Callable[[], dict[str, Any]]) -> None:
        self.health = health
        self.status = status
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        figures, status = self.health.figures(), self.status()
        info = GaugeMetricFamily("inspection_agent_info", "The agent and the model it serves",
                                 labels=["agent", "model_id", "model_version", "backend"])
        info.add_metric([status["agent"], status["model_id"], status["model_version"], status["backend"]], 1)
        yield info
        yield GaugeMetricFamily("inspection_start_time_seconds", "Start of the agent, epoch seconds",
                                value=figures.started)
        frames = CounterMetricFamily("inspection_frames", "Frames inspected, by verdict status", labels=["status"])
        for name, count in (("ok", figures.ok), ("ng", figures.ng), ("error", figures.errors)):
            frames.add_metric([name], count)
        yield frames
        yield CounterMetricFamily("inspection_unjudged", "Frames not inspected before a stop deadline",
                                  value=status["unjudged"])
        yield GaugeMetricFamily("inspection_frames_per_second", "Frames/s over the last health window",
                                value=figures.fps)
        stages = HistogramMetricFamily("inspection_stage_seconds", "Time per frame in each stage (total: the "
                                                                   "whole frame)", labels=["stage"])
        for stage, (cumulative, seconds) in figures.histograms.items():
            buckets = [(_le(bound), n) for bound, n in zip(STAGE_BUCKETS_S, cumulative)]
            stages.add_metric([stage], buckets + [("+Inf", cumulative[-1])], sum_value=seconds)
        yield stages
        for section, key, name, doc in _COUNTERS:
            if status.get(section) is not None:
                yield CounterMetricFamily(name, doc, value=status[section][key])
        for section, key, name, doc in _GAUGES:
            if status.get(section) is not None:
                yield GaugeMetricFamily(name, doc, value=float(status[section][key]))
        state = GaugeMetricFamily("inspection_mqtt_state", "1 for the broker connection's state", labels=["state"])
        for name in _MQTT_STATES:
            state.add_metric([name], float(status["mqtt"]["state"] == name))
        yield state
        if status.get("archive") is not None:
            yield GaugeMetricFamily("inspection_archive_failing", "1 while archive writes fail",
                                    value=float(status["archive"]["state"] == "failing"))


def _le(bound: float) -> str:
    return f"{bound:g}"
