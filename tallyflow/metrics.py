"""Prometheus metrics, read from the process's counters at scrape time (no per-event cost)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from operators.stats import Stats


class StatsCollector(Collector):
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
        yield GaugeMetricFamily("tallyflow_redis_up", "0 while input waits for Redis (dedup store, register).", value=int(s.redis_up))
        yield CounterMetricFamily("tallyflow_resent_lines", "Pending rated lines of a dead process produced again.", value=s.resent_lines)
        reloads = CounterMetricFamily("tallyflow_catalog_reloads", "Catalog reloads by outcome.", labels=["outcome"])
        reloads.add_metric(["ok"], s.catalog_reloads)
        reloads.add_metric(["error"], s.catalog_reload_errors)
        yield reloads


def serve(stats: Stats, port: int) -> None:
    """Expose /metrics on `port` (0: do nothing)."""
    if port:
        REGISTRY.register(StatsCollector(stats))
        start_http_server(port, addr="0.0.0.0")
