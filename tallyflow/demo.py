"""`make demo`: the whole pipeline locally on embedded defaults, then what happened.

Starts a broker, generates a day-boundary's worth of traffic for 1,000 tenants (with
duplicates, late and malformed events), runs the rating dataflow until the input is
consumed, reads the output topics back and prints a summary with a conservation check.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec

from schemas.catalog import load_catalog
from schemas.outputs import DeadLetter, RatedUsageLine, ThresholdAlert
from tallyflow.bench import run_dataflow
from tallyflow.config import load_settings, tune_gc
from tallyflow.generator import GenSpec, produce
from tallyflow.stack import LocalStack
from tallyflow.topics import read_topic

# Event time runs from 23:30 on 31 October to 00:30 on 1 November: one billing period
# closes mid-demo, a plan upgrade happens at 23:50, and a 10-minute grace makes hours-late
# October events arrive too late once November is 10 minutes old.
DEMO_START = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)
DEMO_ENV = {"TALLYFLOW_GRACE_SECONDS": "600"}


def _row(label: str, value: object, width: int = 34) -> str:
    return f"  {label:<{width}} {value}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="tallyflow demo", description=__doc__)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    print("tallyflow demo: starting the local broker ...", flush=True)
    with LocalStack(redis=False) as st:
        s = load_settings({**DEMO_ENV}, brokers=st.brokers)
        print(
            f"  broker {st.brokers}; settings: window {s.window_seconds:g}s, grace {s.grace_seconds:g}s, "
            f"dedup horizon {s.dedup_horizon_seconds:g}s, shards {s.shards}",
            flush=True,
        )
        st.create_topics({s.input_topic: args.partitions, s.alerts_topic: 1, s.rated_topic: 1, s.dlq_topic: 1})
        cat = load_catalog(s.catalog)
        spec = GenSpec(total=args.events, tenants=args.tenants, seed=args.seed, start=DEMO_START, span=timedelta(hours=1))
        print(
            f"generating {spec.total:,} events for {spec.tenants:,} tenants "
            f"({spec.duplicate_pct}% duplicates, {spec.late_pct}% late, {spec.malformed_pct}% malformed) ...",
            flush=True,
        )
        gen = produce(st.brokers, s.input_topic, spec, cat, progress=sys.stderr.isatty())
        print(f"  produced {gen.produced:,} in {gen.seconds:.1f}s", flush=True)
        print("running the rating dataflow until the input is consumed ...", flush=True)
        tune_gc()
        t0 = time.perf_counter()
        stats = run_dataflow(s, gen.end_offsets)
        secs = time.perf_counter() - t0
        alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(st.brokers, s.alerts_topic)]
        lines = [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(st.brokers, s.rated_topic)]
        dead = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(st.brokers, s.dlq_topic)]

    amounts: dict[str, Decimal] = {}
    for ln in lines:
        amounts[ln.currency] = amounts.get(ln.currency, Decimal(0)) + ln.amount
    by_reason = Counter(d.reason for d in dead)
    by_level = Counter(a.level for a in alerts)
    corrections = sum(1 for ln in lines if ln.revision > 0)
    accounted = stats.accepted + stats.duplicates + len(dead)
    print()
    print("summary")
    print(_row("events produced", f"{gen.produced:,}"))
    print(_row("  of which generated as", ", ".join(f"{k} {v:,}" for k, v in sorted(gen.kinds.items()))))
    print(_row("records processed", f"{stats.records_in:,} in {secs:.1f}s ({stats.records_in / secs:,.0f}/s)"))
    print(_row("accepted", f"{stats.accepted:,}"))
    print(_row("duplicates dropped", f"{stats.duplicates:,}"))
    print(_row("dead letters (usage.dlq)", f"{len(dead):,}"))
    for reason, n in sorted(by_reason.items()):
        print(_row(f"  {reason}", f"{n:,}"))
    print(_row("alerts (usage.alerts)", f"{len(alerts):,}"))
    for level, n in sorted(by_level.items()):
        print(_row(f"  {level}", f"{n:,}"))
    print(_row("rated lines (usage.rated)", f"{len(lines):,} ({corrections:,} corrections for late events)"))
    for cur, amt in sorted(amounts.items()):
        print(_row(f"  amount {cur}", f"{amt:,}"))
    print(_row("alert_id unique", "yes" if len({a.alert_id for a in alerts}) == len(alerts) else "NO"))
    print(_row("line_id unique", "yes" if len({ln.line_id for ln in lines}) == len(lines) else "NO"))
    gap = stats.records_in - accounted
    topics_agree = len(dead) == sum(stats.dead.values()) and len(lines) == stats.lines and len(alerts) == sum(stats.alerts.values())
    ok = gap == 0 and stats.records_in == gen.produced and topics_agree
    verdict = (
        "OK"
        if ok
        else (
            f"MISMATCH: in {stats.records_in:,} vs produced {gen.produced:,}, "
            f"difference {gap:,}, topics agree with counters: {topics_agree}"
        )
    )
    print(
        _row(
            "conservation",
            f"{stats.records_in:,} in = {stats.accepted:,} accepted + {stats.duplicates:,} duplicates "
            f"+ {len(dead):,} dead letters: {verdict}",
        )
    )
    if alerts:
        print("\nan alert:", msgspec.json.encode(alerts[0]).decode())
    if corrections:
        print("a correction:", msgspec.json.encode(next(ln for ln in lines if ln.revision > 0)).decode())
    if dead:
        d = dead[0]
        print(f"a dead letter: reason={d.reason} message={d.message!r} at {d.topic}/{d.partition}@{d.offset}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
