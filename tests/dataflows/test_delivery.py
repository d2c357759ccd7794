"""Delivery against the real broker, redis-server and the sandbox on loopback: the
delivery dataflows run as real `bytewax.run` processes, so they can be killed. The ERP
delivery takes the rated lines and the credit ledger's records, each once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from confluent_kafka import Producer

from devkit.pipeline import wait_until
from devkit.sandbox import Sandbox
from devkit.stack import LocalStack
from ops.reconcile import compare_money, credit_ledger, rated_and_acknowledged
from runtime.kafka import read_topic
from runtime.settings import Settings, to_env
from schemas.outputs import ENCODER, RatedUsageLine, ThresholdAlert
from sinks.erp import CREDITS
from state.ledger import Ledger
from tallyflow.cli import main as tallyflow
from tests.support import credits
from tests.support.lines import rated_line, threshold_alert

HMAC_KEY = "test-hmac-key"


class FlowProcess:
    def __init__(self, spec: str, s: Settings, log: Path) -> None:
        env = {**os.environ, **to_env(s)}
        self.log = log
        self.p = subprocess.Popen([sys.executable, "-m", "bytewax.run", spec], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


# Delivery policies a test can wait out: quick retries, a quick breaker, small ERP batches soon.
QUICK_DELIVERY = {
    "retry_base_seconds": 0.05,
    "retry_cap_seconds": 0.5,
    "breaker_threshold": 3,
    "breaker_reset_seconds": 0.5,
    "erp_batch_max_latency_seconds": 0.3,
    "erp_rate_per_second": 50.0,
}


def with_exceptions_topic(s: Settings, stack: LocalStack, **flat: object) -> Settings:
    """`s` with quick delivery policies, and an exceptions topic, a credit ledger and review
    topics of the test's own."""
    tag = uuid.uuid4().hex[:8]
    topics = {f"{name}_topic": f"{name}-{tag}" for name in ("exceptions", "credits", "review", "audit", "status")}
    s = s.replace(**topics, **{**QUICK_DELIVERY, **flat})
    stack.create_topics(dict.fromkeys(topics.values(), 1))
    return s


def produce(s: Settings, topic: str, records: list[Any]) -> dict[str, float]:
    """Produce records keyed by tenant; returns id -> time it was handed to the broker."""
    p = Producer({"bootstrap.servers": s.kafka.brokers, "linger.ms": 0})
    sent: dict[str, float] = {}
    for r in records:
        p.produce(topic, ENCODER.encode(r), r.tenant_id.encode())
        sent[getattr(r, "alert_id", None) or r.line_id] = time.time()
    p.flush()
    return sent


def lines(n: int, rng: random.Random) -> list[RatedUsageLine]:
    return [
        rated_line(
            tenant_id=f"t-{rng.randint(1, 9):04d}",
            erp_customer_id="ERP",
            contract_id="C",
            product_code="SKU",
            meter="tokens",
            quantity=rng.randint(1, 999),
            amount=Decimal(rng.randint(0, 99_999)) / 100,
            pricing_version="starter:v1",
            event_count=3,
            at="2026-11-01T00:00:00.000Z",
        )
        for _ in range(n)
    ]


def alerts(n: int) -> list[ThresholdAlert]:
    return [
        threshold_alert(
            tenant_id=f"t-{i:04d}",
            crm_account_id=f"CRM-{i}",
            meter="tokens",
            period="2026-11",
            level="100%",
            limit=100,
            usage=101,
            crossed_at="2026-11-01T00:00:00.000Z",
            correlation_id=f"e{i}",
            plan_id="starter",
            detected_at="2026-11-01T00:00:00.100Z",
        )
        for i in range(n)
    ]


def totals(items: list[dict[str, Any]] | list[RatedUsageLine]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for it in items:
        t, a = (it["tenant_id"], Decimal(it["amount"])) if isinstance(it, dict) else (it.tenant_id, it.amount)
        out[t] = out.get(t, Decimal(0)) + a
    return out


def test_alerts_flow_while_the_erp_is_down_and_the_backlog_drains_after(dsettings, sandbox, flows):
    erp, crm, success = (sandbox.state.endpoints[k] for k in ("erp", "crm", "success"))
    sandbox.fault("erp", "down")
    flows("erp", dsettings)
    flows("alerts", dsettings)
    backlog = lines(400, random.Random(1))
    produce(dsettings, dsettings.topics.rated, backlog)
    wait_until(lambda: len(erp.requests) >= 3, 30, "the ERP delivery to be retrying against the outage")

    batch = alerts(40)
    sent = produce(dsettings, dsettings.topics.alerts, batch)
    wait_until(lambda: len(crm.accepted) == 40 and len(success.accepted) == 40, 30, "all alerts at CRM and success tool")
    latency = sorted(crm.accepted[a.alert_id]["received_at"] - sent[a.alert_id] for a in batch)
    assert latency[-1] < 2.0, f"alert latency grew while the ERP was down: max {latency[-1]:.3f}s"
    assert len(erp.accepted) == 0 and all(status == 503 for _, status in erp.requests)

    sandbox.clear_faults()
    wait_until(lambda: len(erp.accepted) == 400, 60, "the ERP backlog to drain")
    assert erp.duplicates == [] and crm.duplicates == [] and success.duplicates == []
    assert totals(list(erp.accepted.values())) == totals(backlog)
    assert 400 / sum(1 for _, st in erp.requests if st == 200) > 10  # lines travel in batches
    # The ledger's view (what reconcile calls ERP-acknowledged) agrees with the ERP's.
    rated, acked = rated_and_acknowledged(dsettings, with_erp=True)
    assert acked is not None and acked.amount == rated.amount and acked.quantity == rated.quantity


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_while_the_erp_is_down_the_backlog_waits_in_kafka_not_in_memory(dsettings, sandbox, flows):
    erp = sandbox.state.endpoints["erp"]
    sandbox.fault("erp", "down")
    proc = flows("erp", dsettings)
    rng = random.Random(5)
    first = lines(5_000, rng)
    produce(dsettings, dsettings.topics.rated, first)
    wait_until(lambda: len(erp.requests) >= 4, 30, "the ERP delivery to be retrying")
    before = rss_mb(proc.p.pid)
    backlog = first + lines(60_000, rng)  # ~45 MB of lines arrive while the ERP is down
    produce(dsettings, dsettings.topics.rated, backlog[5_000:])
    n = len(erp.requests)
    wait_until(lambda: len(erp.requests) >= n + 4, 30, "more retries after the backlog grew")
    grown = rss_mb(proc.p.pid) - before
    assert grown < 20, f"the delivery process grew by {grown:.0f} MB while the ERP was down: the backlog is in memory"
    sandbox.clear_faults()
    wait_until(lambda: len(erp.accepted) == len(backlog), 120, "the backlog to drain")
    assert erp.duplicates == [] and totals(list(erp.accepted.values())) == totals(backlog)


def test_429_storm_keeps_under_the_rate_limit_and_honours_retry_after(dsettings, sandbox, flows):
    s = dsettings.replace(erp_rate_per_second=5.0, erp_batch_max_lines=20)
    erp = sandbox.state.endpoints["erp"]
    sandbox.fault("erp", "throttle", count=4, retry_after=0.6)
    backlog = lines(200, random.Random(2))
    produce(s, s.topics.rated, backlog)
    flows("erp", s)
    wait_until(lambda: len(erp.accepted) == 200, 60, "all lines at the ERP")
    times = [t for t, _ in erp.requests]
    assert len(times) >= 14  # 10 batches + 4 throttled attempts
    for i, t in enumerate(times):
        in_one_second = sum(1 for u in times[i:] if u - t < 1.0)
        assert in_one_second <= 6, f"{in_one_second} requests within 1s (limit 5/s, burst 1)"
    for (t, status), (nxt, _) in zip(erp.requests, erp.requests[1:], strict=False):
        if status == 429:
            assert nxt - t >= 0.6 - 0.05, "a request came before Retry-After elapsed"
    assert erp.duplicates == []


def test_a_rejected_batch_goes_to_the_exceptions_topic_and_the_rest_flows(dsettings, sandbox, flows):
    s = dsettings.replace(erp_batch_max_lines=50)
    erp = sandbox.state.endpoints["erp"]
    sandbox.fault("erp", "reject", count=1)
    backlog = lines(200, random.Random(3))
    produce(s, s.topics.rated, backlog)
    flows("erp", s)
    wait_until(lambda: len(erp.accepted) == 150, 60, "the accepted batches")
    parked = wait_until(lambda: read_topic(s.kafka.brokers, s.topics.exceptions), 30, "the exception record")
    assert len(parked) == 1
    rec = orjson.loads(parked[0])
    assert rec["destination"] == "erp" and rec["status"] == 422 and len(rec["ids"]) == 50
    assert {ln["line_id"] for ln in rec["items"]} == set(rec["ids"]) == set(rec["reasons"])
    assert all(r.startswith("422") for r in rec["reasons"].values())
    assert set(rec["ids"]).isdisjoint(erp.accepted)
    assert set(rec["ids"]) | set(erp.accepted) == {ln.line_id for ln in backlog}


def test_delivery_killed_mid_batch_and_restarted_delivers_each_line_once(dsettings, sandbox, flows):
    s = dsettings.replace(erp_batch_max_lines=50)
    erp = sandbox.state.endpoints["erp"]
    sandbox.fault("erp", "latency", latency_ms=1500)
    backlog = lines(200, random.Random(4))
    produce(s, s.topics.rated, backlog)
    first = flows("erp", s)
    wait_until(lambda: erp.inflight >= 1, 30, "a batch in flight")
    first.kill9()  # the ERP finishes that request; the ledger never hears back
    wait_until(lambda: erp.inflight == 0, 10, "the in-flight request to complete")
    sandbox.clear_faults()
    flows("erp", s)  # restarts from the beginning of the topic (no recovery state)
    wait_until(lambda: len(erp.accepted) == 200, 60, "every line at the ERP")
    assert erp.duplicates == [], "a line reached the ERP twice"
    assert erp.replays >= 1  # the in-doubt batch was re-sent identically and recognised
    assert totals(list(erp.accepted.values())) == totals(backlog)


def test_alerts_are_delivered_once_across_a_restart(dsettings, sandbox, flows):
    crm, success = sandbox.state.endpoints["crm"], sandbox.state.endpoints["success"]
    batch = alerts(30)
    produce(dsettings, dsettings.topics.alerts, batch)
    first = flows("alerts", dsettings)
    wait_until(lambda: len(crm.accepted) == 30 and len(success.accepted) == 30, 30, "first delivery")
    first.stop()
    flows("alerts", dsettings)  # re-reads the topic from the beginning
    more = alerts(5)
    produce(dsettings, dsettings.topics.alerts, more)
    wait_until(lambda: len(crm.accepted) == 35 and len(success.accepted) == 35, 30, "the new alerts")
    assert crm.duplicates == [] and success.duplicates == []
    # The ledger skipped what was acknowledged; an alert in doubt at the stop may be re-sent,
    # under the same key, and the remote replays it instead of taking it again.
    assert len(crm.requests) - crm.replays == 35 and len(success.requests) - success.replays == 35
    assert crm.replays + success.replays <= 2


def test_lines_pending_under_an_expired_intent_are_sent_afresh(dsettings, sandbox, flows):
    from state.ledger import PENDING, Ledger

    erp = sandbox.state.endpoints["erp"]
    backlog = lines(120, random.Random(6))
    # A previous process marked these pending, and the written-ahead body has since expired.
    ledger = Ledger(dsettings.stores)
    ledger.r.mset({ledger.key("erp", ln.line_id): PENDING + "expired-key" for ln in backlog[:70]})
    produce(dsettings, dsettings.topics.rated, backlog)
    flows("erp", dsettings)
    wait_until(lambda: len(erp.accepted) == 120, 60, "every line, including the in-doubt ones")
    assert erp.duplicates == []


def test_alerts_go_concurrently_up_to_the_rate_limit_and_never_above_it(dsettings, sandbox, flows):
    """A CRM answering in 150 ms: one request at a time would deliver ~6 alerts/s; with
    requests in flight at once the limit (20/s) is what paces them, and it still holds."""
    s = dsettings.replace(crm_rate_per_second=20.0, alert_max_in_flight=8)
    crm, success = sandbox.state.endpoints["crm"], sandbox.state.endpoints["success"]
    sandbox.fault("crm", "latency", latency_ms=150)
    flows("alerts", s)
    batch = alerts(40)
    produce(s, s.topics.alerts, batch)
    wait_until(lambda: len(crm.accepted) == 40 and len(success.accepted) == 40, 30, "all alerts at CRM and success tool")
    assert 1 < crm.peak_inflight <= 8, f"{crm.peak_inflight} CRM requests in flight at most (window 8)"
    times = sorted(t for t, _ in crm.requests)
    assert times[-1] - times[0] < 3.5, f"40 alerts took {times[-1] - times[0]:.1f}s: one at a time takes 6 s"
    for i, t in enumerate(times):
        in_one_second = sum(1 for u in times[i:] if u - t < 1.0)
        assert in_one_second <= 21, f"{in_one_second} CRM requests within 1s (limit 20/s, burst 1)"
    assert crm.duplicates == [] and success.duplicates == [] and len(crm.requests) == 40


def test_alert_delivery_killed_with_a_window_in_flight_delivers_each_alert_once(dsettings, sandbox, flows):
    """kill -9 while four CRM requests are in flight: the CRM takes them, the ledger never
    hears; the next process re-sends at most that window, under the same keys, recognised."""
    s = dsettings.replace(alert_max_in_flight=4)
    crm, success = sandbox.state.endpoints["crm"], sandbox.state.endpoints["success"]
    sandbox.fault("crm", "latency", latency_ms=1500)
    batch = alerts(30)
    produce(s, s.topics.alerts, batch)
    first = flows("alerts", s)
    wait_until(lambda: crm.inflight >= 4, 30, "a window of CRM requests in flight")
    first.kill9()
    wait_until(lambda: crm.inflight == 0, 10, "the in-flight requests to complete")
    sandbox.clear_faults()
    flows("alerts", s)  # re-reads the topic from the beginning
    wait_until(lambda: len(crm.accepted) == 30 and len(success.accepted) == 30, 30, "every alert")
    assert crm.duplicates == [] and success.duplicates == []
    assert 1 <= crm.replays <= 4, f"{crm.replays} CRM requests re-sent: the window was 4"
    assert len(crm.requests) - crm.replays == 30


@pytest.fixture
def csettings(small: Settings, stack: LocalStack, sandbox: Sandbox) -> Settings:
    """The small catalog (acme, bolt) against the sandbox, for credit traffic through rating."""
    urls = {"crm_url": sandbox.url, "success_url": sandbox.url, "erp_url": sandbox.url}
    return with_exceptions_topic(small, stack, redis_url=stack.redis_url, success_hmac_key=HMAC_KEY, erp_batch_max_lines=4, **urls)


def test_credit_records_reach_the_erp_once_across_a_kill_9_of_erp_delivery(csettings, sandbox, flows):
    """kill -9 while a batch of credit records is in flight: the ERP takes it, the ledger
    never hears; the next process re-sends that batch under its key, recognised. No grant is
    drawn twice at the ERP and no draw is lost: per grant, drawn - returned there = on the lines."""
    s = csettings
    lines, records = credits.rate(s)
    erp, cerp = sandbox.state.endpoints["erp"], sandbox.state.endpoints["erp-credits"]
    sandbox.fault("erp-credits", "latency", latency_ms=1500)
    first = flows("erp", s)
    wait_until(lambda: cerp.inflight >= 1, 30, "a batch of credit records in flight")
    first.kill9()  # the ERP finishes that request; the ledger never hears back
    wait_until(lambda: cerp.inflight == 0, 10, "the in-flight request to complete")
    assert 0 < len(cerp.accepted) < len(records)
    sandbox.clear_faults()
    flows("erp", s)  # re-reads both topics from the beginning (no recovery state)
    wait_until(lambda: len(cerp.accepted) == len(records) and len(erp.accepted) == len(lines), 60, "every line and record at the ERP")
    assert cerp.duplicates == [] and erp.duplicates == [], "an id reached the ERP twice"
    assert cerp.replays >= 1  # the in-doubt batch was re-sent identically and recognised
    assert set(cerp.accepted) == {r.record_id for r in records}
    assert credits.applied_per_grant(list(cerp.accepted.values())) == credits.used_per_grant(lines)
    # The ERP's gross, credits and net per tenant, as reconcile counts them from the ledger.
    rated, acked = rated_and_acknowledged(s, with_erp=True)
    ledger, acked_credits = credit_ledger(s, with_erp=True)
    assert acked is not None and acked_credits is not None
    acked.credits = acked_credits.credits
    assert compare_money(rated, ledger, acked) == []
    gross: dict[str, Decimal] = {}
    applied: dict[str, Decimal] = {}
    for (tenant, _period, _cur), v in rated.gross.items():
        gross[tenant] = gross.get(tenant, Decimal(0)) + v
    for (tenant, _period, _cur), v in rated.credits.items():
        applied[tenant] = applied.get(tenant, Decimal(0)) + v
    assert {t: by["USD"] for t, by in erp.totals.items()} == gross
    assert {t: by["USD"] for t, by in cerp.totals.items()} == applied and applied["acme"] > 0


def test_reconcile_carries_gross_credits_and_net_and_catches_a_changed_credit(csettings, sandbox, flows, monkeypatch, capsys):
    s = csettings
    lines, records = credits.rate(s)
    flows("erp", s)
    cerp = sandbox.state.endpoints["erp-credits"]
    wait_until(lambda: len(cerp.accepted) == len(records), 60, "every credit record at the ERP")
    for k, v in to_env(s).items():
        monkeypatch.setenv(k, v)

    def reconcile() -> tuple[int, dict[str, Any]]:
        code = tallyflow(["reconcile", "--json"])
        return code, orjson.loads(capsys.readouterr().out)

    code, report = reconcile()
    assert code == 0 and report["money_differences"] == [], report
    money = report["summary"]["money"]
    gross = sum((ln.amount for ln in lines), Decimal(0))
    used = sum(credits.used_per_grant(lines).values(), Decimal(0))
    assert money["rated"]["USD"] == money["erp"]["USD"] == {"gross": str(gross), "credits": str(used), "net": str(gross - used)}
    assert money["ledger"]["USD"] == {"credits": str(used)}

    # A drawn record the ERP never acknowledged (lost in the ledger): the ERP column differs.
    drawn = next(r for r in records if r.kind == "drawn" and r.tenant_id == "bolt")
    Ledger(s.stores).forget(CREDITS, [drawn.record_id])
    code, report = reconcile()
    (row,) = report["money_differences"]
    assert code == 1 and (row["tenant"], row["period"], row["currency"]) == ("bolt", "2026-03", "USD")
    assert Decimal(row["rated_credits"]) - Decimal(row["erp_credits"]) == drawn.amount
    assert Decimal(row["erp_net"]) - Decimal(row["rated_net"]) == drawn.amount
    Ledger(s.stores).ack(CREDITS, [drawn.record_id])
    assert reconcile()[0] == 0

    # A changed copy of a record (same id, another amount) and a draw no line made.
    changed = msgspec.structs.replace(drawn, amount=drawn.amount + Decimal("0.01"))
    forged = msgspec.structs.replace(drawn, record_id="forged-draw", tenant_id="acme", amount=Decimal("1.00"))
    p = Producer({"bootstrap.servers": s.kafka.brokers})
    for r in (changed, forged):
        p.produce(s.topics.credits, ENCODER.encode(r), r.tenant_id.encode())
    p.flush()
    code, report = reconcile()
    assert code == 1 and report["summary"]["conflicting_credit_copies"] == [drawn.record_id]  # the first copy counts
    (row,) = report["money_differences"]
    assert row["tenant"] == "acme" and Decimal(row["ledger_credits"]) - Decimal(row["rated_credits"]) == Decimal("1.00")
