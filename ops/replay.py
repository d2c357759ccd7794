"""`tallyflow replay`: re-rate whole billing periods from the input topic, e.g. after a
pricing fix, and send only the differences to the ERP.

The replay runs the rating dataflow in this process over a bounded offset range (from the
beginning, or `--start-offsets`, to the log end now), keeps the events of the chosen periods
(and tenants), and at the end settles its period-to-date totals against the emission
register: where they equal what was emitted nothing goes out; where they differ, one
correction line per tenant, meter, period and pricing version (revision >= 1, signed delta)
goes to `usage.rated`, and the ERP delivery posts it. Alerts and dead letters are not
produced again. Running it twice changes nothing the second time. Periods are replayed whole because charges are
cumulative within a period; the range must reach back to the period's first event.

`--dry-run` rates the same way and prints what would change, writing nothing.

Examples:
    tallyflow replay --period 2026-10 --dry-run
    tallyflow replay --period 2026-10 --tenant t-0007 --json
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import orjson
from bytewax._bytewax import cli_main

from dataflows.rating import Bounds, Replay, build_flow
from operators.catalog_index import CatalogIndex
from operators.periods import PeriodCache
from operators.settlement import Totals
from operators.stats import Stats
from ops import arguments
from runtime import kafka
from runtime.kafka import log_ends
from runtime.settings import ConfigError, Settings, StoreSettings, load_settings
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER, RatedUsageLine
from state.register import EmissionRegister, Settled

Key = tuple[str, str, str, str]  # tenant, meter, period, pricing version


@dataclass
class Change:
    currency: str = ""
    quantity: Decimal = Decimal(0)
    amount: Decimal = Decimal(0)
    events: int = 0


class _Recorder(EmissionRegister):
    """Stands in for the register during the run: keeps the replay's final totals per key
    (and its last line as the template of a correction); nothing goes out until the end."""

    def __init__(self, store: StoreSettings) -> None:
        super().__init__(store)
        self.last: dict[str, tuple[RatedUsageLine, Totals]] = {}

    def settle(
        self,
        lines: list[RatedUsageLine],
        totals: list[Totals],
        *,
        dry_run: bool = False,
        correction: bool = False,
        read: set[str] | None = None,
    ) -> Settled:
        for ln, t in zip(lines, totals, strict=True):
            self.last[self.key(ln)] = (ln, t)
        return Settled()


def _filter(cat: CatalogIndex, periods: set[str], tenants: set[str]) -> Callable[[str, str, int], bool]:
    cache = PeriodCache()

    def accept(tenant_id: str, pricing_version: str, ts_ms: int) -> bool:
        if tenants and tenant_id not in tenants:
            return False
        kind = cat.plans_by_version[pricing_version].billing_period
        return cache.get(ts_ms, kind).key in periods

    return accept


def _offsets(arg: str | None) -> dict[int, int] | None:
    if not arg:
        return None
    try:
        return {int(p): int(o) for p, o in (x.split(":") for x in arg.split(","))}
    except ValueError:
        raise ConfigError(f"--start-offsets {arg!r}: write partition:offset pairs, e.g. 0:1200,1:980") from None


def replay(
    s: Settings,
    periods: set[str],
    tenants: set[str],
    *,
    dry_run: bool,
    start_offsets: dict[int, int] | None = None,
    progress: bool = False,
) -> tuple[dict[Key, Change], Stats]:
    """Run the replay; return the changes (made, or that would be made) per key."""
    cat = CatalogIndex.build(load_catalog(s.process.catalog))
    ends = log_ends(s.kafka.config(), s.topics.input)
    total = sum(e - (start_offsets or {}).get(p, 0) for p, e in ends.items())
    register = _Recorder(s.stores)
    stats = Stats()
    flow = build_flow(
        s,
        bounds=Bounds(ends, start_offsets),
        stats=stats,
        snapshots=False,
        replay=Replay(register, _filter(cat, periods, tenants)),
    )
    done = threading.Event()
    if progress:
        threading.Thread(target=_progress, args=(stats, total, done), daemon=True).start()
    try:
        cli_main(flow)  # type: ignore[no-untyped-call]
    finally:
        done.set()
    # One correction per key: the difference between the re-rated period-to-date totals
    # and what was emitted, settled through the register like any other line.
    lines = [ln for ln, _ in register.last.values()]
    settled = EmissionRegister(s.stores).settle(lines, [t for _, t in register.last.values()], dry_run=dry_run, correction=True)
    new = settled.lines[settled.resent :]
    if not dry_run and settled.lines:
        p = kafka.producer(s.kafka.config())
        for ln in settled.lines:
            p.produce(s.topics.rated, ENCODER.encode(ln), ln.tenant_id.encode())
        if p.flush(30):
            raise RuntimeError(f"corrections not confirmed by {s.kafka.brokers} within 30 s; run the replay again (it is idempotent)")
        EmissionRegister(s.stores).confirm(settled.confirm, now=True)
    changes = {
        (ln.tenant_id, ln.meter, ln.period, ln.pricing_version): Change(ln.currency, ln.quantity, ln.amount, ln.event_count) for ln in new
    }
    return changes, stats


def _progress(stats: Stats, total: int, done: threading.Event) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="msg", unit_scale=True, desc="replay", mininterval=0.5, file=sys.stderr) as bar:
        while not done.wait(0.5):  # refresh interval of the bar
            bar.update(min(stats.records_in, total) - bar.n)
        bar.update(total - bar.n)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--period", action="append", required=True, help="billing period to re-rate, e.g. 2026-10 (repeatable)")
    ap.add_argument("--tenant", action="append", default=[], help="only this tenant (repeatable; default: all)")
    ap.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    ap.add_argument("--start-offsets", default=None, help="partition:offset,... to start from (default: the beginning)")
    ap.add_argument("--json", action="store_true", help="print JSON for machines")
    ap.add_argument("--limit", type=int, default=20, help="rows of the table (0: all)")


def check(a: argparse.Namespace) -> None:
    """Before the brokers are asked: tenants of the catalog, periods their plans bill by, offsets as pairs."""
    s = load_settings()
    cat = arguments.catalog(s)
    arguments.tenants(cat, a.tenant)
    arguments.periods(cat, a.period, tenant_ids=a.tenant, max_future_seconds=s.limits.max_future_seconds)
    _offsets(a.start_offsets)


def run(a: argparse.Namespace) -> int:
    s = load_settings()
    changes, stats = replay(
        s, set(a.period), set(a.tenant), dry_run=a.dry_run, start_offsets=_offsets(a.start_offsets), progress=not a.json
    )
    rows = sorted(changes.items())
    if a.json:
        print(
            orjson.dumps(
                {
                    "dry_run": a.dry_run,
                    "events": stats.accepted,
                    "changes": [
                        {
                            "tenant": k[0],
                            "meter": k[1],
                            "period": k[2],
                            "pricing_version": k[3],
                            "currency": c.currency,
                            "quantity": str(c.quantity),
                            "amount": str(c.amount),
                            "events": c.events,
                        }
                        for k, c in rows
                    ],
                }
            ).decode()
        )
        return 0
    verb = "would send" if a.dry_run else "sent"
    print(f"replayed {stats.accepted:,} events of {', '.join(sorted(a.period))}; {len(rows)} key(s) changed")
    if rows:
        print(f"{'tenant':<12} {'meter':<10} {'period':<8} {'pricing':<14} {'Δ quantity':>12} {'Δ amount':>14} {'Δ events':>9}")
        shown = rows if a.limit <= 0 else rows[: a.limit]
        for (t, m, p, pv), c in shown:
            q = c.quantity if c.quantity else Decimal(0)
            print(f"{t:<12} {m:<10} {p:<8} {pv:<14} {q:>12} {c.amount:>10} {c.currency} {c.events:>9}")
        if len(shown) < len(rows):
            print(f"… {len(rows) - len(shown)} more (--limit 0 shows all, --json for machines)")
        totals: dict[str, Decimal] = defaultdict(Decimal)
        for _, c in rows:
            totals[c.currency] += c.amount
        print(f"corrections {verb}: " + ", ".join(f"{cur} {amt:+}" for cur, amt in sorted(totals.items())))
    return 0
