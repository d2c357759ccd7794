"""Prometheus metrics of every dataflow.

Hot-path counters live in plain Python objects (`operators.stats.Stats`) and are read at
scrape time; prometheus-client objects are used only where an observation is per request or
per batch (latency histograms, batch sizes), never per event.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from operators.stats import Stats

disable_created_metrics()  # type: ignore[no-untyped-call]  # a `_created` series per counter doubles the series count for nothing here

BUILD = Gauge("tallyflow_build_info", "Always 1; the labels say what runs.", ["version", "dataflow"])
BATCH_SIZE = Histogram(
    "tallyflow_batch_records",
    "Records per batch a dataflow step handles at once.",
    ["dataflow", "step"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)

# ---------------------------------------------------------------- delivery

REQUESTS = Counter(
    "tallyflow_sink_requests", "Requests (attempts) to a destination by result (ok, retry, reject).", ["destination", "result"]
)
REQUEST_SECONDS = Histogram(
    "tallyflow_sink_request_duration_seconds",
    "Time of one HTTP request to a destination, failed ones included.",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter("tallyflow_sink_retries", "Requests repeated after a timeout, 5xx, 408/425/429.", ["destination"])
CIRCUIT = Gauge("tallyflow_sink_circuit_state", "1 for the circuit breaker's current state.", ["destination", "state"])
DELIVERED = Counter(
    "tallyflow_delivered",
    "Alerts and rated lines by destination and outcome (ok, rejected, skipped: already acknowledged).",
    ["destination", "outcome"],
)
DELIVERY_LATENCY = Histogram(
    "tallyflow_alert_delivery_latency_seconds",
    "From an alert's detection to its acknowledgement by a destination.",
    ["destination"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


PENDING_LINES = Gauge("tallyflow_erp_pending_lines", "Rated lines held for the next ERP micro-batch.")
LEDGER_UP = Gauge("tallyflow_ledger_up", "0 while delivery waits for the Redis ledger.")
LEDGER_UP.set(1)


def circuit_state(destination: str, state: str) -> None:
    for s in ("closed", "open", "half_open"):
        CIRCUIT.labels(destination, s).set(1 if s == state else 0)


class StatsCollector(Collector):
    """The rating dataflow's conservation counters, read when Prometheus scrapes."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        rec = CounterMetricFamily("tallyflow_records", "Input records by outcome (conservation: in = the rest).", labels=["outcome"])
        rec.add_metric(["in"], s.records_in)
        rec.add_metric(["accepted"], s.accepted)
        rec.add_metric(["duplicate"], s.duplicates)
        rec.add_metric(["dead_letter"], sum(s.dead.values()))
        yield rec
        dead = CounterMetricFamily("tallyflow_dead_letters", "Dead letters by reason.", labels=["reason"])
        for reason, n in sorted(s.dead.items()):
            dead.add_metric([reason], n)
        yield dead
        alerts = CounterMetricFamily("tallyflow_alerts", "Threshold alerts by level.", labels=["level"])
        for level, n in sorted(s.alerts.items()):
            alerts.add_metric([level], n)
        yield alerts
        lines = CounterMetricFamily("tallyflow_rated_lines", "Rated usage lines by kind.", labels=["kind"])
        lines.add_metric(["original"], s.lines - s.corrections)
        lines.add_metric(["correction"], s.corrections)
        yield lines
        amount = CounterMetricFamily("tallyflow_rated_amount", "Rated amount by currency (sum of line amounts).", labels=["currency"])
        for cur, a in sorted(s.amount.items()):
            amount.add_metric([cur], float(a))  # exposition only; money stays Decimal everywhere else
        yield amount
        yield GaugeMetricFamily("tallyflow_open_windows", "Windows holding usage not yet rated.", value=s.open_windows)
        yield GaugeMetricFamily(
            "tallyflow_input_delay_seconds",
            "How long the oldest record of the last batch waited between its producer and the rating dataflow.",
            value=s.input_delay_s,
        )
        yield GaugeMetricFamily("tallyflow_redis_up", "0 while input waits for Redis (dedup store, register).", value=int(s.redis_up))
        yield CounterMetricFamily("tallyflow_resent_lines", "Pending rated lines of a dead process produced again.", value=s.resent_lines)
        yield CounterMetricFamily("tallyflow_read_model_documents", "Read model documents written to Redis.", value=s.read_model_docs)
        yield CounterMetricFamily(
            "tallyflow_read_model_seconds", "Time spent building and writing the read model.", value=s.read_model_seconds
        )
        reloads = CounterMetricFamily("tallyflow_catalog_reloads", "Catalog reloads by outcome.", labels=["outcome"])
        reloads.add_metric(["ok"], s.catalog_reloads)
        reloads.add_metric(["error"], s.catalog_reload_errors)
        yield reloads
