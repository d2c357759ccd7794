"""`make demo`: the whole pipeline locally on embedded defaults, then what happened.

Starts a broker, redis-server and the CRM / success / ERP sandbox; runs the rating, alert
delivery and ERP delivery dataflows as separate processes; generates a day-boundary's
worth of traffic for 1,000 tenants (duplicates, late and malformed events included); takes
the ERP down for the last 20 s of it; waits until everything is rated and delivered and
prints a summary: alert latency during the outage, the ERP backlog draining, a three-way
reconciliation of events and money, and the usage API answering from the read model.

The input rate adapts to this machine (`Pacer`): on two cores shared by the generator, the
broker, Redis, the sandbox and three dataflows — and whatever else runs there — a fixed
12,500 events/s can be more than rating keeps up with, and the demo would then measure a
backlog growing for 40 s rather than the pipeline's latency. The verdict fails when the
alert latency's p99 exceeds its budget (`ALERT_P99_BUDGET_MS`).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import yaml
from confluent_kafka import KafkaError, Message

from devkit.api import serve
from devkit.generator import GenSpec, credit_events, events
from devkit.pipeline import RECORDS_IN, LocalPipeline, wait_until
from operators.catalog_index import CatalogIndex
from operators.engine import ShardEngine
from operators.stats import Stats
from operators.usage import derive
from operators.validate import Validator
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import DEFAULT_CATALOG, load_settings
from schemas.catalog import Percentage, load_catalog
from schemas.outputs import CreditRecord, DeadLetter, RatedUsageLine, ThresholdAlert
from schemas.usage import TenantUsage
from state.read_model import documents

# Event time runs from 23:30 on 31 October to 00:30 on 1 November: one billing period
# closes mid-demo, a plan upgrade happens at 23:50, and a 10-minute grace makes hours-late
# October events arrive too late once November is 10 minutes old.
DEMO_START = datetime(2026, 10, 31, 23, 30, tzinfo=UTC)
# Prepaid credits for every tenth tenant: 3 grants each (a trial drawn last and expiring
# halfway, a first-priority promo, a large one voided three quarters through), the demo's
# credit ledger.
DEMO_CREDITS = 0.1


def _spec(events_: int, tenants: int = 1000, seed: int = 7, rate: float | None = None) -> GenSpec:
    """The demo's traffic: `events_` usage events over an hour around the month end, with
    prepaid credits for every tenth tenant."""
    return GenSpec(total=events_, tenants=tenants, seed=seed, start=DEMO_START, span=timedelta(hours=1), rate=rate, credits=DEMO_CREDITS)


DEMO_TOKEN = "demo-read-token-0123456789"  # the local demo's only client: read scope, loopback only
DEMO_ENV = {
    "TALLYFLOW_GRACE_SECONDS": "600",
    "TALLYFLOW_IDLE_TIMEOUT_SECONDS": "2",  # flush the last windows soon after traffic stops
    "TALLYFLOW_ERP_RATE_PER_SECOND": "20",
    "TALLYFLOW_ERP_BATCH_MAX_LATENCY_SECONDS": "1",
    "TALLYFLOW_BREAKER_RESET_SECONDS": "2",
    "TALLYFLOW_RETRY_CAP_SECONDS": "2",
    # The sandbox takes far more than the 100 requests/s a real CRM may allow; at 100/s the
    # ~30 alerts the period boundary fires within 100 ms would queue 300 ms for the limit by
    # design, and the demo would show the limit rather than the pipeline.
    "TALLYFLOW_CRM_RATE_PER_SECOND": "500",
    "TALLYFLOW_SUCCESS_RATE_PER_SECOND": "500",
}
# `demo_alert_latency_ms.p99`, event produced -> CRM, over the whole run: above it the verdict fails.
ALERT_P99_BUDGET_MS = 500.0
INPUT_DELAY = "tallyflow_input_delay_seconds"


class Pacer:
    """The demo's input rate: as asked, unless the rating dataflow falls behind it on this
    machine; then lower until it keeps up, and back up as it catches up (multiplicative
    decrease, additive increase, every `TICK_S`). Never below `floor` (half the asked rate):
    the demo takes at most about twice as long, and a machine that cannot rate even that
    shows a backlog, and fails the latency budget, rather than a demo that never ends.

    Three signals: the input rating has not taken in yet (the backlog, which shows a problem
    once latency has grown); how long the oldest record of rating's latest batch waited since
    its producer (`tallyflow_input_delay_seconds`: rating may take in all it is fed in
    batches whose first records waited, and that wait is the alerts' latency, long before a
    backlog shows); and
    the machine's idle CPU (which shows it coming: with no core idle, every process here
    queues for one, and whatever else runs on the machine decides how much is left). After a
    cut it waits `SETTLE_TICKS` before cutting again: a cut shows in what rating takes in
    only a scrape and a few batches later."""

    TICK_S = 0.2
    BEHIND_S = 0.3  # input waiting longer than this (at the current rate) is a backlog forming
    CAUGHT_UP_S = 0.15  # below this, rating keeps up: go back towards the asked rate
    DELAYED_S = 0.15  # records taken in after waiting longer than this: latency forming
    SATURATED = 0.05  # idle share of the machine's CPU below which everything queues
    HEADROOM = 0.15  # idle share above which the rate may rise again
    SETTLE_TICKS = 3

    def __init__(self, ceiling: float, floor: float | None = None) -> None:
        self.ceiling = ceiling
        self.floor = floor if floor is not None else ceiling / 2
        self.rate = self.lowest = ceiling
        self.last = 0
        self.idle: float | None = None  # smoothed over about a second
        self.ticks = self.cut_at = 0
        self.trace: list[tuple[int, float]] = []  # (backlog, rate) per tick

    def update(self, backlog: int, idle: float | None = None, delay: float | None = None) -> float:
        """`backlog`: events produced that the rating dataflow has not taken in yet; `idle`:
        the machine's idle share of CPU since the last tick (None where it is not known);
        `delay`: how long rating's latest records waited since their producer (None: not known)."""
        self.ticks += 1
        if idle is not None:
            self.idle = idle if self.idle is None else 0.6 * self.idle + 0.4 * idle
        saturated = self.idle is not None and self.idle < self.SATURATED
        roomy = self.idle is None or self.idle > self.HEADROOM
        waiting_s = backlog / self.rate
        delayed = delay is not None and delay > self.DELAYED_S
        prompt = delay is None or delay < self.DELAYED_S / 2
        if (waiting_s > self.BEHIND_S and backlog >= self.last) or saturated or delayed:
            if self.ticks - self.cut_at >= self.SETTLE_TICKS:
                self.rate = max(self.floor, self.rate * 0.8)
                self.cut_at = self.ticks
        elif waiting_s < self.CAUGHT_UP_S and roomy and prompt:
            self.rate = min(self.ceiling, self.rate + self.ceiling * 0.02)
        self.last = backlog
        self.lowest = min(self.lowest, self.rate)
        self.trace.append((backlog, self.rate))
        return self.rate


def idle_share() -> Callable[[], float | None]:
    """A sampler of the machine's idle share of CPU since its last call (Linux /proc/stat;
    None elsewhere, and on the first call)."""
    last: list[int] = []

    def sample() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        now = [v[3] + v[4], sum(v)]  # idle + iowait, all
        was = last[:] or now
        last[:] = now
        return (now[0] - was[0]) / (now[1] - was[1]) if now[1] > was[1] else None

    return sample


@dataclass
class Pace:
    """How fast the traffic went: asked, on average, and at the lowest the pacer went."""

    asked: float
    produced: int = 0
    seconds: float = 0.0
    lowest: float = 0.0
    adapted: bool = True
    trace: list[tuple[int, float]] = field(default_factory=list)  # the pacer's (backlog, rate) per tick

    @property
    def average(self) -> float:
        return self.produced / self.seconds if self.seconds else 0.0


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
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="events/s produced at most (default: 12,500; 3,000 with Tryton); slower while the rating dataflow falls behind here",
    )
    ap.add_argument(
        "--fixed-rate", action="store_true", help="produce at --rate whatever rating keeps up with (a backlog then shows as latency)"
    )
    ap.add_argument(
        "--outage", type=float, default=None, help="seconds the ERP is down (default: 20, the traffic's last; 10 with Tryton, from halfway)"
    )
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
    pace: Pace
    credits: list[CreditRecord] = field(default_factory=list)  # the credit ledger (first copies)
    credit_events: int = 0  # grants and voids among the events produced (no usage: in no line)
    sandbox: dict[str, Any] = field(default_factory=dict)  # state, crm and erp items, erp requests


def _produce(
    lp: LocalPipeline, spec: GenSpec, pacer: Pacer | None, outage: tuple[float, threading.Event], sent_at: dict[str, float]
) -> Pace:
    """Produce the demo's traffic, keyed by tenant, paced in steps of 100 events (under 10 ms:
    services send smoothly, and 5,000 events at once would queue in rating as latency) at the
    pacer's rate, which follows what the rating dataflow takes in (its records counter)."""
    s = lp.settings
    step = 100
    bar = _bar(spec.total) if sys.stderr.isatty() else None
    pace = Pace(asked=spec.rate or 0.0, adapted=pacer is not None)
    outage_s, outage_due = outage
    # linger 20 ms, as the generator: on the local broker every fetch that returns data costs
    # in proportion to the log, so many small produce batches slow the whole demo down.
    producer = kafka.producer(s.kafka.config(), **{"linger.ms": 20, "queue.buffering.max.messages": 500_000})
    errors: list[KafkaError] = []
    done = threading.Event()

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)

    def watch(p: Pacer) -> None:
        idle = idle_share()
        idle()
        while not done.wait(p.TICK_S):
            before = pace.produced
            m = lp.metrics()  # a scrape takes tens of ms: compare with the middle
            taken = m.get(RECORDS_IN)
            if taken is not None:
                p.update(max(0, (before + pace.produced) // 2 - int(taken)), idle(), m.get(INPUT_DELAY))

    if pacer is not None:
        threading.Thread(target=watch, args=(pacer,), name="pacer", daemon=True).start()
    catalog = load_catalog(s.process.catalog)
    t0 = due = time.monotonic()
    try:
        for n, (_, tenant, value, eid) in enumerate(events(spec, catalog), 1):
            sent_at.setdefault(eid, time.time())
            while True:
                try:
                    producer.produce(s.topics.input, value, tenant.encode(), on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
            pace.produced = n
            if n % step == 0:
                producer.poll(0)
                rate = pacer.rate if pacer is not None else pace.asked
                if (spec.total - n) <= rate * outage_s:  # the outage ends with the traffic
                    outage_due.set()
                if bar is not None and n % 5000 == 0:
                    bar.set_postfix_str(f"{rate:,.0f}/s", refresh=False)
                    bar.update(5000)
                due += step / rate
                ahead = due - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing to the current rate
                elif ahead < -0.05:
                    due = time.monotonic()  # behind: go on at the rate, do not burst to catch up
        producer.flush()
    finally:
        done.set()
        outage_due.set()
        if bar is not None:
            bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} events were not delivered, first: {errors[0]}")
    pace.seconds = time.monotonic() - t0
    pace.lowest = pacer.lowest if pacer is not None else pace.asked
    pace.trace = pacer.trace if pacer is not None else []
    return pace


def _bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, desc="generate", mininterval=0.5)


def deterministic(events_: int = 500_000, tenants: int = 1000, seed: int = 7) -> dict[str, Any]:
    """What the demo's traffic must come to on any machine, however fast: the rating
    operators over the same generated events, one tenant's events in their order (as the
    keyed partitions give them to the dataflow), no broker. Accepted events, duplicates, dead
    letters and alerts do not depend on timing; rated lines do (how windows close), so they
    are not here. The README's sample output is held to these by a test."""
    s = load_settings(DEMO_ENV)
    stats = Stats()
    judge = Validator(CatalogIndex.build(load_catalog(s.process.catalog)), stats, s.limits)
    engine = ShardEngine(judge, s.engine.config(), stats)
    spec = _spec(events_, tenants, seed)
    values = [v for _, _, v, _ in events(spec, load_catalog(s.process.catalog))]
    alerts: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    now_ms = int(time.time() * 1000)
    for start in range(0, len(values), 1000):
        batch = [_Offline(v, start + i) for i, v in enumerate(values[start : start + 1000])]
        groups, d = judge.route(batch, s.topics.input, 0, "now", now_ms, lambda _: "")
        dead.update(x.reason for x in d)
        out = engine.process(groups.get("", []), s.topics.input, 0, 1000.0, "now")
        dead.update(x.reason for x in out.dead)
        alerts.update(a.level for a in out.alerts)
    engine.flush_all()
    return {
        "accepted": stats.accepted,
        "duplicates": stats.duplicates,
        "dead": dict(sorted(dead.items())),
        "alerts": dict(sorted(alerts.items())),
    }


class _Offline:
    """A generated message as the validator reads a Kafka message (no timestamp, no headers)."""

    __slots__ = ("_o", "_v")

    def __init__(self, value: bytes, offset: int) -> None:
        self._v, self._o = value, offset

    def value(self) -> bytes:
        return self._v

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)

    def headers(self) -> None:
        return None


def _traffic(lp: LocalPipeline, args: argparse.Namespace) -> tuple[int, dict[str, float], dict[str, float], Pace]:
    """Produce the demo's traffic while its script takes the ERP down for the traffic's last
    `--outage` seconds (halfway through at the asked rate): the ERP backlog then drains after
    the traffic, as it did before the rate adapted, rather than competing with rating for the
    same two cores while the demo measures alert latency."""
    spec = _spec(args.events, args.tenants, args.seed, args.rate)
    outage: dict[str, float] = {}
    due = threading.Event()

    def erp_outage() -> None:
        due.wait()  # the demo's script: the traffic's last seconds
        lp.sandbox.fault("erp", "down")
        outage["down"] = time.time()
        print(f"\n  >>> ERP sandbox DOWN for {args.outage:g}s", flush=True)
        time.sleep(args.outage)
        lp.sandbox.clear_faults()
        outage["up"] = time.time()
        print("\n  >>> ERP sandbox back UP", flush=True)

    how = "at a fixed" if args.fixed_rate else "at up to"
    print(
        f"generating {spec.total:,} events for {spec.tenants:,} tenants {how} {args.rate:,.0f}/s "
        f"({spec.duplicate_pct}% duplicates, {spec.late_pct}% late, {spec.malformed_pct}% malformed) ...",
        flush=True,
    )
    script = threading.Thread(target=erp_outage, daemon=True)
    script.start()
    sent_at: dict[str, float] = {}
    pace = _produce(lp, spec, None if args.fixed_rate else Pacer(args.rate), (args.outage, due), sent_at)
    script.join()
    print(
        f"  produced {pace.produced:,} in {pace.seconds:.1f}s ({pace.average:,.0f}/s); waiting for rating and delivery to finish ...",
        flush=True,
    )
    return pace.produced, sent_at, outage, pace


def _observe(lp: LocalPipeline, produced: int, sent_at: dict[str, float], outage: dict[str, float], pace: Pace) -> Observed:
    s = lp.settings
    m = lp.wait_rated(produced, 120)

    def topic(name: str, t: Any) -> list[Any]:
        return [msgspec.json.decode(v, type=t) for v in read_topic(s.kafka.brokers, name)]

    o = Observed(
        produced,
        m,
        topic(s.topics.alerts, ThresholdAlert),
        _first_copies(topic(s.topics.rated, RatedUsageLine)),
        topic(s.topics.dlq, DeadLetter),
        sent_at,
        outage,
        pace,
        list({r.record_id: r for r in reversed(topic(s.topics.credits, CreditRecord))}.values()),
    )
    want = {
        "crm": {a.alert_id for a in o.alerts if "crm" in a.destinations},
        "success": {a.alert_id for a in o.alerts if "success" in a.destinations},
        "erp": {ln.line_id for ln in o.lines},
    }

    def delivered() -> bool:
        state = lp.sandbox.state()  # one call per poll: the sandbox is busy taking the ERP backlog
        return all(state[k]["accepted"] >= len(want[k]) for k in want)

    wait_until(delivered, 180, "every alert and line to be delivered")
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
    print(_row("input rate", _pace(o.pace)))
    print(_row("accepted", f"{accepted:,}"))
    print(_row("duplicates dropped", f"{dups:,}  (the same source and id again, for the same tenant)"))
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(Counter(d.reason for d in o.dead).items()))
    print(_row("dead letters (usage.dlq)", f"{len(o.dead):,}  {reasons}"))
    levels = ", ".join(f"{lv} {n}" for lv, n in sorted(Counter(a.level for a in o.alerts).items()))
    print(_row("threshold alerts (usage.alerts)", f"{len(o.alerts):,}  by level: {levels}"))
    print(_row("rated lines (usage.rated)", f"{len(o.lines):,}  ({sum(1 for ln in o.lines if ln.revision):,} corrections of late events)"))
    for label, text in _contracts(o.lines):
        print(_row(label, text))
    for label, text in _credits(o):
        print(_row(label, text))
    print(
        _row(
            "conservation",
            f"{records_in:,} in = {accepted:,} accepted + {dups:,} duplicates + {len(o.dead):,} dead letters: "
            + ("OK" if conserved else "MISMATCH"),
        )
    )
    return conserved


def _gross_credits(rows: Any) -> dict[str, tuple[Decimal, Decimal]]:
    """Per legal entity and currency (`eu/EUR`; the currency alone without entities): the
    lines' gross and the credits they applied."""
    out: dict[str, tuple[Decimal, Decimal]] = {}
    for entity, cur, amount, uses in rows:
        key = f"{entity}/{cur}" if entity else cur
        g, c = out.get(key, (Decimal(0), Decimal(0)))
        out[key] = (g + amount, c + sum((a for _, a in uses), Decimal(0)))
    return out


def _credits(o: Observed) -> list[tuple[str, str]]:
    """The credit ledger in words: grants, what they paid, what expired or was voided, and
    the periods trued up to their plan's minimum."""
    if not o.credits and not any(ln.kind == "minimum_true_up" for ln in o.lines):
        return []
    by: dict[str, dict[str, Decimal]] = {}
    grants: set[str] = set()
    for r in o.credits:
        by.setdefault(r.kind, {})
        by[r.kind][r.currency] = by[r.kind].get(r.currency, Decimal(0)) + r.amount
        grants.add(r.grant_id)

    def money(kind: str) -> str:
        return ", ".join(f"{cur} {v:,}" for cur, v in sorted(by.get(kind, {}).items())) or "none"

    ups = [ln for ln in o.lines if ln.kind == "minimum_true_up"]
    up_money = ", ".join(f"{cur} {v:,}" for cur, v in sorted(_money((ln.currency, ln.amount) for ln in ups).items())) or "none"
    return [
        ("prepaid credits (usage.credits)", f"{len(grants):,} grants, {money('granted')}"),
        ("  drawn by rated lines", f"{money('drawn')} (returned by corrections {money('returned')})"),
        ("  expired / voided", f"{money('expired')} / {money('voided')}"),
        ("minimum true-ups", f"{len(ups):,} periods billed below their plan's minimum: {up_money}"),
    ]


def _first_copies(lines: list[RatedUsageLine]) -> list[RatedUsageLine]:
    """Each line id once, its first copy (a crash replay may produce a line again; the ERP
    counts the first)."""
    seen: dict[str, RatedUsageLine] = {}
    for ln in lines:
        seen.setdefault(ln.line_id, ln)
    return list(seen.values())


def _contracts(lines: list[RatedUsageLine]) -> list[tuple[str, str]]:
    """What the contracts beyond a unit price made (docs/pricing.md): a matrix meter's money
    per cell, a percentage meter's fees on its volume."""
    out: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str], Decimal] = {}
    for ln in lines:
        if ln.dimensions is not None:
            k = (ln.meter, "/".join(ln.dimensions.values()) or '""', ln.currency)
            cells[k] = cells.get(k, Decimal(0)) + ln.amount
    for meter in sorted({m for m, _, _ in cells}):
        mine = sorted(((c, cur, a) for (m, c, cur), a in cells.items() if m == meter), key=lambda x: -x[2])
        n = sum(1 for ln in lines if ln.meter == meter)
        top = ", ".join(f"{c} {cur} {a:,}" for c, cur, a in mine[:4])
        out.append((f"{meter}: priced by cell (matrix)", f"{n:,} lines in {len(mine)} cells; {top}{' …' if len(mine) > 4 else ''}"))
    fee_meters = {
        slug for plan in load_catalog(DEFAULT_CATALOG).plans for slug, pm in plan.meters.items() if isinstance(pm.price, Percentage)
    }
    for meter in sorted({ln.meter for ln in lines if ln.meter in fee_meters}):
        volume = _money((ln.currency, ln.quantity) for ln in lines if ln.meter == meter)
        fees = _money((ln.currency, ln.amount) for ln in lines if ln.meter == meter)
        text = "; ".join(f"{cur} {fees[cur]:,} on {volume[cur]:,}" for cur in sorted(fees))
        out.append((f"{meter}: fees (percentage)", text))
    return out


def _pace(p: Pace) -> str:
    if not p.adapted:
        return f"{p.average:,.0f} events/s (fixed at {p.asked:,.0f}/s asked)"
    if p.lowest >= p.asked:
        return f"{p.average:,.0f} events/s (as asked: rating kept up with {p.asked:,.0f}/s here)"
    floor = " (its floor)" if p.lowest <= p.asked / 2 else ""
    return (
        f"{p.average:,.0f} events/s on average, {p.lowest:,.0f}/s at the lowest{floor}: asked {p.asked:,.0f}/s, "
        "slowed while rating fell behind or no core was idle"
    )


def _delivery(o: Observed) -> tuple[int, float]:
    """Prints what reached the sandbox; returns the number of ids that arrived twice and
    the alert latency's p99 in ms."""
    sb = o.sandbox
    crm, erp, want, state = sb["items"]["crm"], sb["items"]["erp"], sb["want"], sb["state"]
    down, up = o.outage["down"], o.outage["up"]
    by_alert = {a.alert_id: a for a in o.alerts}
    # From the event that crossed the level (a credit alert is crossed by a rated line, later
    # by design: it is measured from no event).
    timed = [i for i in want["crm"] if by_alert[i].correlation_id in o.sent_at]
    latency = [crm[i]["received_at"] - o.sent_at[by_alert[i].correlation_id] for i in timed]
    during = [x for i, x in zip(timed, latency, strict=True) if down <= crm[i]["received_at"] <= up]
    print("\nsummary: delivery (what the CRM, success-tool and ERP sandbox accepted)")
    print(_row("ERP outage", f"{up - down:.1f}s"))
    for dest, label in (("crm", "the CRM"), ("success", "the success tool")):
        skipped = sorted({a.level for a in o.alerts if dest not in a.destinations})
        why = f"every alert but the {', '.join(skipped)} level(s), whose thresholds do not notify {label}" if skipped else "every alert"
        print(_row(f"alerts to {label}", f"{len(want[dest]):,}  ({why})"))
    p99_ms = _pct(sorted(latency), 0.99) * 1000
    print(_row("alert latency, event produced -> CRM", _ms(latency)))
    print(_row("  of which during the ERP outage", f"{len(during):,} alerts, {_ms(during)}"))
    met = "met" if p99_ms <= ALERT_P99_BUDGET_MS else "EXCEEDED"
    print(_row("  budget (demo_alert_latency_ms.p99)", f"p99 <= {ALERT_P99_BUDGET_MS:,.0f} ms: {met} ({p99_ms:,.0f} ms)"))
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
    return int(dup_ids), p99_ms


def _reconcile(o: Observed) -> bool:
    erp = o.sandbox["items"]["erp"]
    accepted = int(o.metrics["tallyflow_records_total{outcome=accepted}"]) - o.credit_events  # usage events only
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
    # Gross, credits applied and net, per entity and currency: what the lines say, and what the ERP got.
    rated_gcn = _gross_credits(
        (ln.legal_entity, ln.currency, ln.amount, [(c.grant_id, c.amount) for c in ln.credits or []]) for ln in o.lines
    )
    erp_gcn = _gross_credits(
        (
            x.get("legal_entity"),
            x["currency"],
            Decimal(x["amount"]),
            [(u["grant_id"], Decimal(u["amount"])) for u in x.get("credits") or ()],
        )
        for x in erp.values()
    )
    for cur in sorted(rated_gcn):
        (g, c), (eg, ec) = rated_gcn[cur], erp_gcn.get(cur, (Decimal(0), Decimal(0)))
        print(_row(f"gross - credits = net {cur}", f"rated {g:,} - {c:,} = {g - c:,}; ERP {eg:,} - {ec:,} = {eg - ec:,}"))
    money_ok = rated_money == erp_money and per_tenant and rated_gcn == erp_gcn
    return accepted == rated_events == erp_events and money_ok


def _serving(lp: LocalPipeline, o: Observed, api: str, stays_up: bool = True) -> bool:
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
    if stays_up:  # a URL only while something answers it
        print(_row("usage page", f"{api.replace('://', f'://demo:{DEMO_TOKEN}@')}/tenants/{tenant}?period={period}"))
    return True


def _interactive(args: argparse.Namespace) -> bool:
    """Whether the demo keeps its pages up at the end (then, and only then, it names them)."""
    return not args.no_wait and sys.stdin.isatty()


def _keep_page_up(lp: LocalPipeline, args: argparse.Namespace) -> None:
    """The sandbox and usage pages named above are still there to look at, until Enter."""
    if not _interactive(args):
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
        page = f", sandbox {lp.sandbox.url} (open it in a browser)" if _interactive(args) else ""
        print(f"  broker {s.kafka.brokers}, redis {s.stores.redis_url}{page}")
        print(
            f"  window {s.engine.window_seconds:g}s, grace {s.engine.grace_seconds:g}s, ERP batches of up to {s.erp.batch_max_lines} "
            f"lines or {s.erp.batch_max_latency_seconds:g}s, ERP limit {s.erp.rate_per_second:g} req/s, CRM / success-tool limits "
            f"{s.crm.rate_per_second:g} / {s.success.rate_per_second:g} req/s with up to {s.delivery.alert_max_in_flight} in flight",
            flush=True,
        )
        o = _observe(lp, *_traffic(lp, args))
        o.credit_events = credit_events(_spec(args.events, args.tenants, args.seed), load_catalog(s.process.catalog))
        conserved = _rating(o)
        dup_ids, p99_ms = _delivery(o)
        reconciled = _reconcile(o)
        tokens = lp.logdir / "api-tokens.yaml"
        tokens.write_text(yaml.safe_dump({"clients": [{"name": "demo", "token": DEMO_TOKEN, "scopes": ["read"]}]}))
        with serve(s.replace(api_tokens_file=str(tokens))) as api:
            served = _serving(lp, o, api, _interactive(args))
            failed = verdict(conserved, reconciled, served, dup_ids, bool(o.sandbox["delivered"]), p99_ms)
            print(_row("verdict", "OK" if not failed else "FAILED: " + "; ".join(failed)))
            _keep_page_up(lp, args)
    return 1 if failed else 0


def verdict(conserved: bool, reconciled: bool, served: bool, dup_ids: int, delivered: bool, alert_p99_ms: float) -> list[str]:
    """What failed (nothing: OK). Alerts later than their budget fail the demo like lost money."""
    failed = [what for ok, what in ((conserved, "conservation"), (reconciled, "reconciliation"), (served, "read model")) if not ok]
    if dup_ids:
        failed.append(f"{dup_ids} ids received twice")
    if not delivered:
        failed.append("not everything delivered")
    if not alert_p99_ms <= ALERT_P99_BUDGET_MS:  # NaN (no alerts) fails too
        failed.append(f"alert latency p99 {alert_p99_ms:,.0f} ms over its {ALERT_P99_BUDGET_MS:,.0f} ms budget")
    return failed
