"""What every dataflow process shows its operators: Prometheus metrics, /healthz and /readyz
on one port, and JSON logs that carry correlation ids.

Hot-path counters live in plain Python objects (`operators.stats.Stats`) and are read at
scrape time; prometheus-client objects are used only where an observation is per request or
per batch (latency histograms, batch sizes), never per event.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from operators.stats import Stats

# ---------------------------------------------------------------- metrics of every dataflow

disable_created_metrics()  # type: ignore[no-untyped-call]  # a `_created` series per counter doubles the series count for nothing here

BUILD = Gauge("tallyflow_build_info", "Always 1; the labels say what runs.", ["version", "dataflow"])
BATCH_SIZE = Histogram(
    "tallyflow_batch_records",
    "Records per batch a dataflow step handles at once.",
    ["dataflow", "step"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)

# ---------------------------------------------------------------- delivery

REQUESTS = Counter("tallyflow_sink_requests", "HTTP requests to a destination by result (ok, retry, reject).", ["destination", "result"])
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
        yield GaugeMetricFamily("tallyflow_redis_up", "0 while input waits for Redis (dedup store, register).", value=int(s.redis_up))
        yield CounterMetricFamily("tallyflow_resent_lines", "Pending rated lines of a dead process produced again.", value=s.resent_lines)
        reloads = CounterMetricFamily("tallyflow_catalog_reloads", "Catalog reloads by outcome.", labels=["outcome"])
        reloads.add_metric(["ok"], s.catalog_reloads)
        reloads.add_metric(["error"], s.catalog_reload_errors)
        yield reloads


# ---------------------------------------------------------------- health


class Health:
    """Liveness and readiness of this process.

    Live: the process answers. A worker blocked in a sink while a destination is down is
    backpressure doing its job, not a hang, so liveness does not judge progress (a restart
    would only repeat the wait). Ready: the dataflow was built, its worker has joined the
    cluster (it listed its input partitions), and no dependency check names a problem."""

    def __init__(self) -> None:
        self.built = False
        self.running = False
        self.checks: dict[str, Callable[[], str | None]] = {}

    def problems(self) -> list[str]:
        out = [] if self.built else ["dataflow not built yet"]
        if not self.running:
            out.append("worker has not joined the cluster yet")
        for name, check in self.checks.items():
            why = check()
            if why:
                out.append(f"{name}: {why}")
        return out


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b'{"status":"ok"}', "application/json")
        elif path == "/readyz":
            problems = HEALTH.problems()
            body = orjson.dumps({"status": "not ready" if problems else "ready", "problems": problems})
            self._send(503 if problems else 200, body, "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds are not news
        pass


def serve(port: int, dataflow: str, stats: Stats | None = None) -> ThreadingHTTPServer | None:
    """Expose /metrics, /healthz and /readyz on `port` (0: do nothing)."""
    from tallyflow import __version__

    BUILD.labels(__version__, dataflow).set(1)
    if not port:
        return None
    if stats is not None:
        REGISTRY.register(StatsCollector(stats))
    server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="observability", daemon=True).start()
    return server


# ---------------------------------------------------------------- logs

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Fields passed with `extra=` (alert_id, correlation_id,
    line_ids, batch_id, ...) become top-level keys, so one search follows an event to its
    alert, a rated line to its ERP batch."""

    def __init__(self, dataflow: str) -> None:
        super().__init__()
        self.static = {"dataflow": dataflow, "pod": os.environ.get("BYTEWAX_POD_NAME") or socket.gethostname()}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(fmt: str, level: str, dataflow: str) -> None:
    """Route this process's logs to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(dataflow))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {dataflow} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):  # a line per request would drown the correlation logs
        logging.getLogger(noisy).setLevel(logging.WARNING)
