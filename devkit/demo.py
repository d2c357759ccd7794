"""`make demo`: the whole pipeline locally on embedded defaults, then what happened.

Starts a broker, redis-server and the CRM / success / ERP sandbox; runs the rating, alert
delivery and ERP delivery dataflows as separate processes; generates a day-boundary's
worth of traffic for 1,000 tenants (duplicates, late and malformed events included); takes
the ERP down for 20 s halfway through; waits until everything is rated and delivered and
prints a summary: alert latency during the outage, the ERP backlog draining, a three-way
reconciliation of events and money, and the usage API answering from the read model.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import yaml

from devkit.api import serve
from devkit.generator import GenSpec, produce
from devkit.pipeline import RECORDS_IN, LocalPipeline, wait_until
from operators.catalog_index import CatalogIndex
from operators.usage import derive
from runtime.kafka import read_topic
from schemas.catalog import load_catalog
from schemas.outputs import DeadLetter, RatedUsageLine, ThresholdAlert
from schemas.usage import TenantUsage
from state.read_model import documents

# Event time runs from 23:30 on 31 October to 00:30 on 1 November: one billing period
# closes mid-demo, a plan upgrade happens at 23:50, and a 10-minute grace makes hours-late
# October events arrive too late once November is 10 minutes old.
DEMO_START = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)
DEMO_TOKEN = "demo-read-token-0123456789"  # the local demo's only client: read scope, loopback only
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
    ap.add_argument(
        "--erp",
        choices=["sandbox", "tryton"],
        default="sandbox",
        help="sandbox: Tallyflow's own ERP/CRM endpoints; tryton: a real Tryton as ERP and CRM (README: Tryton)",
    )
    ap.add_argument("--events", type=int, default=None, help="events to generate (default: 500,000; 60,000 with Tryton)")
    ap.add_argument(
        "--tenants", type=int, default=None, help="tenants of the example catalog that send them (default: 1,000; 50 with Tryton)"
    )
    ap.add_argument("--rate", type=float, default=None, help="events/s produced (default: 12,500; 3,000 with Tryton)")
    ap.add_argument("--outage", type=float, default=None, help="seconds the ERP is down, starting halfway (default: 20; 10 with Tryton)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the traffic generator (same seed, same traffic)")
    ap.add_argument(
        "--no-wait",
        action="store_true",
        help="stop at once after the summary (without it, a terminal keeps the sandbox page up until Enter)",
    )


@dataclass
class Observed:
    """What the demo saw: the rating counters, the three output topics, the sandbox."""

    produced: int
    metrics: dict[str, float]
    alerts: list[ThresholdAlert]
    lines: list[RatedUsageLine]
    dead: list[DeadLetter]
    sent_at: dict[str, float]
    outage: dict[str, float]
    sandbox: dict[str, Any] = field(default_factory=dict)  # state, crm and erp items, erp requests


def _traffic(lp: LocalPipeline, args: argparse.Namespace) -> tuple[int, dict[str, float], dict[str, float]]:
    """Produce the demo's traffic while its script takes the ERP down halfway through."""
    s = lp.settings
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
    gen = produce(s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog), progress=sys.stderr.isatty(), sent_at=sent_at)
    script.join()
    print(f"  produced {gen.produced:,} in {gen.seconds:.1f}s; waiting for rating and delivery to finish ...", flush=True)
    return gen.produced, sent_at, outage


def _observe(lp: LocalPipeline, produced: int, sent_at: dict[str, float], outage: dict[str, float]) -> Observed:
    s = lp.settings
    m = lp.wait_rated(produced, 120)

    def topic(name: str, t: Any) -> list[Any]:
        return [msgspec.json.decode(v, type=t) for v in read_topic(s.kafka.brokers, name)]

    o = Observed(
        produced,
        m,
        topic(s.topics.alerts, ThresholdAlert),
        topic(s.topics.rated, RatedUsageLine),
        topic(s.topics.dlq, DeadLetter),
        sent_at,
        outage,
    )
    want = {
        "crm": {a.alert_id for a in o.alerts if "crm" in a.destinations},
        "success": {a.alert_id for a in o.alerts if "success" in a.destinations},
        "erp": {ln.line_id for ln in o.lines},
    }
    wait_until(lambda: all(lp.sandbox.state()[k]["accepted"] >= len(want[k]) for k in want), 180, "every alert and line to be delivered")
    items = {k: lp.sandbox.items(k) for k in want}
    o.sandbox = {"state": lp.sandbox.state(), "items": items, "erp_requests": lp.sandbox.requests("erp"), "want": want}
    o.sandbox["delivered"] = all(want[k] <= items[k].keys() for k in want)
    return o


def _rating(o: Observed) -> bool:
    m = o.metrics
    accepted, dups = int(m["tallyflow_records_total{outcome=accepted}"]), int(m["tallyflow_records_total{outcome=duplicate}"])
    records_in = int(m[RECORDS_IN])
    conserved = records_in == o.produced == accepted + dups + len(o.dead)
    print("\nsummary: rating (what the rating dataflow made of the input)")
    print(_row("events produced", f"{o.produced:,}"))
    print(_row("accepted", f"{accepted:,}"))
    print(_row("duplicates dropped", f"{dups:,}  (the same source and id again, for the same tenant)"))
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(Counter(d.reason for d in o.dead).items()))
    print(_row("dead letters (usage.dlq)", f"{len(o.dead):,}  {reasons}"))
    levels = ", ".join(f"{lv} {n}" for lv, n in sorted(Counter(a.level for a in o.alerts).items()))
    print(_row("threshold alerts (usage.alerts)", f"{len(o.alerts):,}  by level: {levels}"))
    print(_row("rated lines (usage.rated)", f"{len(o.lines):,}  ({sum(1 for ln in o.lines if ln.revision):,} corrections of late events)"))
    print(
        _row(
            "conservation",
            f"{records_in:,} in = {accepted:,} accepted + {dups:,} duplicates + {len(o.dead):,} dead letters: "
            + ("OK" if conserved else "MISMATCH"),
        )
    )
    return conserved


def _delivery(o: Observed) -> int:
    """Prints what reached the sandbox; returns the number of ids that arrived twice."""
    sb = o.sandbox
    crm, erp, want, state = sb["items"]["crm"], sb["items"]["erp"], sb["want"], sb["state"]
    down, up = o.outage["down"], o.outage["up"]
    by_alert = {a.alert_id: a for a in o.alerts}
    latency = [crm[i]["received_at"] - o.sent_at[by_alert[i].correlation_id] for i in want["crm"]]
    during = [x for i, x in zip(want["crm"], latency, strict=True) if down <= crm[i]["received_at"] <= up]
    print("\nsummary: delivery (what the CRM, success-tool and ERP sandbox accepted)")
    print(_row("ERP outage", f"{up - down:.1f}s"))
    for dest, label in (("crm", "the CRM"), ("success", "the success tool")):
        skipped = sorted({a.level for a in o.alerts if dest not in a.destinations})
        why = f"every alert but the {', '.join(skipped)} level(s), whose thresholds do not notify {label}" if skipped else "every alert"
        print(_row(f"alerts to {label}", f"{len(want[dest]):,}  ({why})"))
    print(_row("alert latency, event produced -> CRM", _ms(latency)))
    print(_row("  of which during the ERP outage", f"{len(during):,} alerts, {_ms(during)}"))
    erp_ok = sum(1 for _, st in sb["erp_requests"] if st == 200)
    erp_events = sum(x["event_count"] for x in erp.values())
    print(_row("ERP requests by status", ", ".join(f"{k}: {v}" for k, v in sorted(state["erp"]["by_status"].items()))))
    per = f"{len(erp) / max(1, erp_ok):.0f} lines, {erp_events / max(1, erp_ok):,.0f} events per request"
    print(_row("ERP lines accepted", f"{len(erp):,} in {erp_ok:,} requests ({per})"))
    backlog = sum(1 for x in erp.values() if x["received_at"] > up)
    drained = max(x["received_at"] for x in erp.values()) - up
    print(_row("ERP backlog after the outage", f"{backlog:,} lines, drained {drained:.1f}s after the ERP came back"))
    dup_ids = sum(state[k]["duplicates"] for k in ("crm", "success", "erp"))
    print(_row("alert_id / line_id received twice", dup_ids))
    return int(dup_ids)


def _reconcile(o: Observed) -> bool:
    erp = o.sandbox["items"]["erp"]
    accepted = int(o.metrics["tallyflow_records_total{outcome=accepted}"])
    rated_money = _money((ln.currency, ln.amount) for ln in o.lines)
    erp_money = _money((x["currency"], x["amount"]) for x in erp.values())
    rated_events = sum(ln.event_count for ln in o.lines)
    erp_events = sum(x["event_count"] for x in erp.values())
    per_tenant = _money(((ln.tenant_id, ln.currency), ln.amount) for ln in o.lines) == _money(
        ((x["tenant_id"], x["currency"]), x["amount"]) for x in erp.values()
    )
    print("\nreconciliation (source = rating counters, rated = usage.rated, ERP = accepted by the sandbox)")
    print(_row("events", f"source {accepted:,} = rated {rated_events:,} = ERP {erp_events:,}"))
    for cur in sorted(set(rated_money) | set(erp_money)):
        print(_row(f"amount {cur}", f"rated {rated_money.get(cur, 0):,} = ERP {erp_money.get(cur, 0):,}"))
    print(_row("per tenant and currency", "all equal" if per_tenant else "DIFFER"))
    return accepted == rated_events == erp_events and rated_money == erp_money and per_tenant


def _serving(lp: LocalPipeline, o: Observed, api: str) -> bool:
    """The read model the rating dataflow kept in Redis against usage.rated, per tenant, meter
    and period, and `tallyflow api` answering an entitlement check from it."""
    want_q: dict[tuple[str, str, str], Decimal] = {}
    want_a: dict[tuple[str, str, str], Decimal] = {}
    for ln in o.lines:
        k = (ln.tenant_id, ln.meter, ln.period)
        want_q[k] = want_q.get(k, Decimal(0)) + ln.quantity
        want_a[k] = want_a.get(k, Decimal(0)) + ln.amount

    cat = CatalogIndex.build(load_catalog(lp.settings.process.catalog))

    def agrees() -> list[TenantUsage] | None:
        docs = [derive(cat, f) for _, f in documents(lp.settings.stores)]
        q = {(d.tenant_id, m.meter, d.period): m.quantity for d in docs for m in d.meters.values()}
        a = {(d.tenant_id, m.meter, d.period): m.amount for d in docs for m in d.meters.values()}
        return docs if (q, a) == (want_q, want_a) else None

    print("\nserving (the read model in Redis, and tallyflow api answering from it)")
    try:
        docs = wait_until(agrees, 30, "the read model to agree with usage.rated")
    except TimeoutError:
        print(_row("read model = rated", "DIFFER"))
        return False
    print(_row("read model = rated", f"{len(want_q):,} tenant/meter/period totals, all equal"))
    tenant, period = max(
        ((d.tenant_id, d.period) for d in docs), key=lambda k: next(d.events for d in docs if (d.tenant_id, d.period) == k)
    )
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    ent = httpx.get(f"{api}/v1/tenants/{tenant}/entitlements/api_calls", params={"period": period}, headers=headers).json()
    print(
        _row(
            f"entitlement {tenant} api_calls {period}",
            f"has_access {str(ent['has_access']).lower()}, used {ent['used']} of {ent['included']} included "
            f"under {ent['pricing_version']}, overage {ent['overage']}",
        )
    )
    print(_row("usage page", f"{api.replace('://', f'://demo:{DEMO_TOKEN}@')}/tenants/{tenant}?period={period}"))
    return True


def _keep_page_up(lp: LocalPipeline, args: argparse.Namespace) -> None:
    """The sandbox and usage pages named above are still there to look at, until Enter."""
    if args.no_wait or not sys.stdin.isatty():
        return
    print(f"\nthe sandbox page is still up at {lp.sandbox.url} ; press Enter to stop everything", flush=True)
    sys.stdin.readline()


VARIANTS = {
    "sandbox": {"events": 500_000, "tenants": 1000, "rate": 12_500.0, "outage": 20.0},
    "tryton": {"events": 60_000, "tenants": 50, "rate": 3_000.0, "outage": 10.0},  # Tryton on SQLite: ~2k lines/s
}


def run(args: argparse.Namespace) -> int:
    for k, v in VARIANTS[args.erp].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.erp == "tryton":
        from devkit.demo_tryton import run as run_tryton

        return run_tryton(args)
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
        o = _observe(lp, *_traffic(lp, args))
        conserved = _rating(o)
        dup_ids = _delivery(o)
        reconciled = _reconcile(o)
        tokens = lp.logdir / "api-tokens.yaml"
        tokens.write_text(yaml.safe_dump({"clients": [{"name": "demo", "token": DEMO_TOKEN, "scopes": ["read"]}]}))
        with serve(s.replace(api_tokens_file=str(tokens))) as api:
            served = _serving(lp, o, api)
            ok = conserved and reconciled and served and dup_ids == 0 and bool(o.sandbox["delivered"])
            print(_row("verdict", "OK" if ok else "MISMATCH"))
            _keep_page_up(lp, args)
    return 0 if ok else 1
