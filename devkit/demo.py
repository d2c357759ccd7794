"""`make demo`: the whole pipeline locally on embedded defaults, then what happened.

Starts a broker, redis-server and the CRM / success / ERP sandbox; runs the rating, alert
delivery and ERP delivery dataflows as separate processes; generates a day-boundary's
worth of traffic for 1,000 tenants (duplicates, late and malformed events included); takes
the ERP down for 20 s halfway through; waits until everything is rated and delivered and
prints a summary: alert latency during the outage, the ERP backlog draining, and a
three-way reconciliation of events and money.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from devkit.generator import GenSpec, produce
from devkit.pipeline import RECORDS_IN, LocalPipeline, wait_until
from runtime.kafka import read_topic
from schemas.catalog import load_catalog
from schemas.outputs import DeadLetter, RatedUsageLine, ThresholdAlert

# Event time runs from 23:30 on 31 October to 00:30 on 1 November: one billing period
# closes mid-demo, a plan upgrade happens at 23:50, and a 10-minute grace makes hours-late
# October events arrive too late once November is 10 minutes old.
DEMO_START = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)
DEMO_ENV = {
    "TALLYFLOW_GRACE_SECONDS": "600",
    "TALLYFLOW_IDLE_TIMEOUT_SECONDS": "2",  # flush the last windows soon after traffic stops
    "TALLYFLOW_ERP_RATE_PER_SECOND": "20",
    "TALLYFLOW_ERP_BATCH_MAX_LATENCY_SECONDS": "1",
    "TALLYFLOW_BREAKER_RESET_SECONDS": "2",
    "TALLYFLOW_RETRY_CAP_SECONDS": "2",
}


def _row(label: str, value: object, width: int = 40) -> str:
    return f"  {label:<{width}} {value}"


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {_pct(xs, 0.5) * 1000:.0f} ms, p99 {_pct(xs, 0.99) * 1000:.0f} ms, max {xs[-1] * 1000:.0f} ms" if xs else "n/a"


def _money(rows: Any) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for cur, amt in rows:
        out[cur] = out.get(cur, Decimal(0)) + Decimal(amt)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--events", type=int, default=500_000, help="events to generate")
    ap.add_argument("--tenants", type=int, default=1000, help="tenants of the example catalog that send them")
    ap.add_argument("--rate", type=float, default=12_500, help="events/s produced (40 s for 500k)")
    ap.add_argument("--outage", type=float, default=20, help="seconds the ERP is down, starting halfway")
    ap.add_argument("--seed", type=int, default=7, help="seed of the traffic generator (same seed, same traffic)")


def run(args: argparse.Namespace) -> int:
    print("tallyflow demo: starting broker, redis-server, sandbox and the three dataflows ...", flush=True)
    with LocalPipeline(DEMO_ENV) as lp:
        s = lp.settings
        lp.start_all()
        print(f"  broker {s.kafka.brokers}, redis {s.stores.redis_url}, sandbox {lp.sandbox.url} (open it in a browser)")
        print(
            f"  window {s.engine.window_seconds:g}s, grace {s.engine.grace_seconds:g}s, ERP batches of up to {s.erp.batch_max_lines} "
            f"lines or {s.erp.batch_max_latency_seconds:g}s, ERP limit {s.erp.rate_per_second:g} req/s",
            flush=True,
        )

        cat = load_catalog(s.process.catalog)
        spec = GenSpec(total=args.events, tenants=args.tenants, seed=args.seed, start=DEMO_START, span=timedelta(hours=1), rate=args.rate)
        outage: dict[str, float] = {}

        def erp_outage() -> None:
            time.sleep(spec.total / args.rate / 2)  # the demo's script: halfway through the traffic
            lp.sandbox.fault("erp", "down")
            outage["down"] = time.time()
            print(f"\n  >>> ERP sandbox DOWN for {args.outage:g}s", flush=True)
            time.sleep(args.outage)
            lp.sandbox.clear_faults()
            outage["up"] = time.time()
            print("\n  >>> ERP sandbox back UP", flush=True)

        print(
            f"generating {spec.total:,} events for {spec.tenants:,} tenants at {args.rate:,.0f}/s "
            f"({spec.duplicate_pct}% duplicates, {spec.late_pct}% late, {spec.malformed_pct}% malformed) ...",
            flush=True,
        )
        script = threading.Thread(target=erp_outage, daemon=True)
        script.start()
        sent_at: dict[str, float] = {}
        gen = produce(s.kafka.brokers, s.topics.input, spec, cat, progress=sys.stderr.isatty(), sent_at=sent_at)
        script.join()
        print(f"  produced {gen.produced:,} in {gen.seconds:.1f}s; waiting for rating and delivery to finish ...", flush=True)

        m = lp.wait_rated(gen.produced, 120)
        alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
        lines = [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated)]
        dead = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.brokers, s.topics.dlq)]
        want = {
            "crm": {a.alert_id for a in alerts if "crm" in a.destinations},
            "success": {a.alert_id for a in alerts if "success" in a.destinations},
            "erp": {ln.line_id for ln in lines},
        }
        wait_until(
            lambda: all(lp.sandbox.state()[k]["accepted"] >= len(want[k]) for k in want), 180, "every alert and line to be delivered"
        )
        crm, erp = lp.sandbox.items("crm"), lp.sandbox.items("erp")
        state = lp.sandbox.state()
        erp_requests = lp.sandbox.requests("erp")
        delivered = all(want[k] <= lp.sandbox.items(k).keys() for k in want)

    # -- what happened ---------------------------------------------------------------------
    accepted, dups = int(m["tallyflow_records_total{outcome=accepted}"]), int(m["tallyflow_records_total{outcome=duplicate}"])
    records_in = int(m[RECORDS_IN])
    by_alert = {a.alert_id: a for a in alerts}
    latency = [crm[i]["received_at"] - sent_at[by_alert[i].correlation_id] for i in want["crm"]]
    during = [
        crm[i]["received_at"] - sent_at[by_alert[i].correlation_id]
        for i in want["crm"]
        if outage["down"] <= crm[i]["received_at"] <= outage["up"]
    ]
    erp_ok = [t for t, st in erp_requests if st == 200]
    drained = max(x["received_at"] for x in erp.values()) - outage["up"]
    backlog_at_up = sum(1 for x in erp.values() if x["received_at"] > outage["up"])
    rated_money = _money((ln.currency, ln.amount) for ln in lines)
    erp_money = _money((x["currency"], x["amount"]) for x in erp.values())
    rated_events = sum(ln.event_count for ln in lines)
    erp_events = sum(x["event_count"] for x in erp.values())
    per_tenant_ok = _money(((ln.tenant_id, ln.currency), ln.amount) for ln in lines) == _money(
        ((x["tenant_id"], x["currency"]), x["amount"]) for x in erp.values()
    )
    dup_ids = sum(state[k]["duplicates"] for k in ("crm", "success", "erp"))
    conserved = records_in == gen.produced == accepted + dups + len(dead)
    reconciled = accepted == rated_events == erp_events and rated_money == erp_money and per_tenant_ok
    ok = conserved and reconciled and dup_ids == 0 and delivered

    print("\nsummary: rating")
    print(_row("events produced", f"{gen.produced:,}"))
    print(_row("accepted", f"{accepted:,}"))
    print(_row("duplicates dropped", f"{dups:,}"))
    print(
        _row(
            "dead letters (usage.dlq)",
            f"{len(dead):,}  " + ", ".join(f"{r} {n}" for r, n in sorted(Counter(d.reason for d in dead).items())),
        )
    )
    print(
        _row(
            "alerts (usage.alerts)",
            f"{len(alerts):,}  " + ", ".join(f"{lv} {n}" for lv, n in sorted(Counter(a.level for a in alerts).items())),
        )
    )
    print(_row("rated lines (usage.rated)", f"{len(lines):,} ({sum(1 for ln in lines if ln.revision):,} corrections)"))
    print(
        _row(
            "conservation",
            f"{records_in:,} in = {accepted:,} accepted + {dups:,} duplicates + {len(dead):,} dead letters: "
            + ("OK" if conserved else "MISMATCH"),
        )
    )
    print("\nsummary: delivery")
    print(_row("ERP outage", f"{outage['up'] - outage['down']:.1f}s"))
    print(_row("alerts at CRM / success tool", f"{len(want['crm']):,} / {len(want['success']):,}"))
    print(_row("alert latency, event produced -> CRM", _ms(latency)))
    print(_row("  of which during the ERP outage", f"{len(during):,} alerts, {_ms(during)}"))
    print(_row("ERP requests", ", ".join(f"{k}: {v}" for k, v in sorted(state["erp"]["by_status"].items()))))
    print(
        _row(
            "ERP lines accepted",
            f"{len(erp):,} in {len(erp_ok):,} requests ({len(erp) / max(1, len(erp_ok)):.0f} lines, "
            f"{erp_events / max(1, len(erp_ok)):,.0f} events per request)",
        )
    )
    print(_row("ERP backlog after the outage", f"{backlog_at_up:,} lines, drained {drained:.1f}s after the ERP came back"))
    print(_row("duplicate alert_id / line_id at sandbox", dup_ids))
    print("\nreconciliation (source = rating counters, rated = usage.rated, ERP = accepted by the sandbox)")
    print(_row("events", f"source {accepted:,} = rated {rated_events:,} = ERP {erp_events:,}"))
    for cur in sorted(set(rated_money) | set(erp_money)):
        print(_row(f"amount {cur}", f"rated {rated_money.get(cur, 0):,} = ERP {erp_money.get(cur, 0):,}"))
    print(_row("per tenant and currency", "all equal" if per_tenant_ok else "DIFFER"))
    print(_row("verdict", "OK" if ok else "MISMATCH"))
    if latency:
        print(f"\n  (median alert latency {statistics.median(latency) * 1000:.0f} ms)")
    return 0 if ok else 1
