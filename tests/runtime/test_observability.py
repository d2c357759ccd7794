"""Operations: a real Prometheus server scrapes the three running dataflows, the exposition
passes `promtool check metrics`, the health endpoints answer, the Grafana dashboard charts
only metrics that exist, and the JSON logs let one follow an event to its alert and a rated
line to its ERP batch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from dataflows import FLOWS
from devkit.generator import GenSpec, produce
from devkit.pipeline import LocalPipeline, wait_until
from runtime.kafka import read_topic
from schemas.catalog import load_catalog
from schemas.outputs import RatedUsageLine, ThresholdAlert
from tests.support.prometheus import Prometheus

pytestmark = pytest.mark.integration  # starts the whole pipeline as processes

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "components" / "monitoring" / "tallyflow-dashboard.json"
ENV = {"TALLYFLOW_SHARDS": "8", "TALLYFLOW_IDLE_TIMEOUT_SECONDS": "2", "TALLYFLOW_ERP_BATCH_MAX_LATENCY_SECONDS": "0.3"}
# What the issue asks a dashboard to show, as the metric each is read from.
MUST_CHART = {
    "events in": "tallyflow_records_total",
    "dead letters by reason": "tallyflow_dead_letters_total",
    "alerts by level": "tallyflow_alerts_total",
    "rated lines": "tallyflow_rated_lines_total",
    "rated amounts": "tallyflow_rated_amount_total",
    "sink request latency": "tallyflow_sink_request_duration_seconds_bucket",
    "retries": "tallyflow_sink_retries_total",
    "circuit state": "tallyflow_sink_circuit_state",
    "batch sizes": "tallyflow_batch_records_bucket",
    "backlog": "tallyflow_consumer_lag_messages",
    "alert latency": "tallyflow_alert_delivery_latency_seconds_bucket",
    "rating's input delay": "tallyflow_input_delay_seconds",
}


def _logs(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a process (Bytewax's own start-up lines are not JSON)."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\btallyflow_[a-z_]+", e)}


def test_prometheus_scrapes_every_dataflow_and_logs_correlate() -> None:
    with LocalPipeline(env=ENV, partitions=2) as lp:
        s = lp.settings
        lp.start_all()
        start = datetime(2026, 11, 1, tzinfo=UTC)
        spec = GenSpec(total=6_000, tenants=40, duplicate_pct=2, malformed_pct=1, seed=11, start=start, span=timedelta(minutes=10))
        res = produce(s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog))
        m = lp.wait_rated(res.produced, 90)
        alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
        lines = [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated)]
        assert alerts and lines
        want_crm = {a.alert_id for a in alerts if "crm" in a.destinations}
        wait_until(lambda: lp.sandbox.items("crm").keys() >= want_crm, 60, "every CRM alert delivered")
        wait_until(lambda: lp.sandbox.items("erp").keys() >= {ln.line_id for ln in lines}, 60, "every line posted")

        # Health: every process is live and ready, and says so in JSON.
        for name, port in lp.ports.items():
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}, name
            r = httpx.get(f"http://127.0.0.1:{port}/readyz")
            assert (r.status_code, r.json()["status"]) == (200, "ready"), (name, r.text)

        # promtool lints every exposition (naming, types, help).
        promtool = shutil.which("promtool")
        assert promtool, "promtool comes with the Debian prometheus package; `make deps` installs it"
        for name, port in lp.ports.items():
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            chk = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
            assert chk.returncode == 0, (name, chk.stdout.decode(), chk.stderr.decode())

        # A real Prometheus scrapes all three; what it stores is what the processes count.
        with Prometheus({name: port for name, port in lp.ports.items()}) as prom:
            wait_until(lambda: list(prom.query("up").values()) == [1.0] * len(FLOWS), 30, "Prometheus to scrape every dataflow")
            accepted = m["tallyflow_records_total{outcome=accepted}"]
            wait_until(
                lambda: (
                    prom.query('tallyflow_records_total{outcome="accepted"}').get(
                        f"instance=127.0.0.1:{lp.ports['rate']},job=rate,outcome=accepted"
                    )
                    == accepted
                ),
                30,
                "Prometheus to hold the accepted count",
            )
            crm_ok = 'sum by (destination) (tallyflow_delivered_total{outcome="ok",destination="crm"})'
            wait_until(lambda: prom.query(crm_ok).get("destination=crm") == len(want_crm), 30, "Prometheus to hold the CRM deliveries")
            assert prom.query("sum(tallyflow_sink_request_duration_seconds_count)")[""] >= len(want_crm)
            stored = set(prom.api("label/__name__/values"))
            # The dashboard charts only what exists, and everything operations needs.
            charted = _dashboard_metrics()
            assert charted <= stored, f"the dashboard charts metrics nobody exports: {sorted(charted - stored)}"
            missing = {what: name for what, name in MUST_CHART.items() if name not in charted}
            assert not missing, f"the dashboard does not chart {missing}"

        # Logs: event id -> alert id -> delivery, and line id -> ERP batch, by JSON fields.
        fired = {r["alert_id"]: r["correlation_id"] for r in _logs(lp.logdir / "rate.log") if r["msg"] == "threshold alert"}
        assert fired == {a.alert_id: a.correlation_id for a in alerts}
        sent = [r for r in _logs(lp.logdir / "alerts.log") if r["msg"] == "alert delivered"]
        assert {r["alert_id"] for r in sent if r["destination"] == "crm"} == want_crm
        assert all(fired[r["alert_id"]] == r["correlation_id"] for r in sent)
        batches = [r for r in _logs(lp.logdir / "erp.log") if r["msg"] == "erp batch posted"]
        posted = {i: b["batch_id"] for b in batches for i in b["line_ids"]}
        assert posted.keys() == {ln.line_id for ln in lines}
        assert all(b["dataflow"] == "erp" and b["level"] == "info" for b in batches)
