"""`tallyflow reconcile`: per tenant, meter and billing period, compare

* source totals — recounted from the input topic with the rating rules (validation,
  dedup, lateness, pricing) in one plain pass, outside any dataflow;
* rated totals — the sum of `usage.rated` (originals and corrections; a line id on the topic
  twice counts once, its first copy, as at the ERP; copies that differ are reported);
* ERP-acknowledged totals — the rated lines the delivery ledger records as accepted.

Prints a table of the differences (or a one-line OK) and exits 1 when anything differs.
The recount reads each partition in order; it matches the live pipeline when each tenant's
events share a partition (producers key by tenant), as the spec asks them to.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec
from confluent_kafka import Message

from operators.catalog_index import CatalogIndex
from operators.engine import ShardEngine
from operators.periods import iso
from operators.stats import Stats
from operators.validate import Validator
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import Settings, load_settings
from schemas.catalog import load_catalog
from schemas.outputs import RatedUsageLine

Key = tuple[str, str, str]  # tenant, meter, period
SOURCES = ("source", "rated", "erp")


@dataclass
class Totals:
    quantity: dict[Key, Decimal] = field(default_factory=dict)
    amount: dict[Key, Decimal] = field(default_factory=dict)
    currency: dict[Key, str] = field(default_factory=dict)

    def add(self, ln: RatedUsageLine) -> None:
        k = (ln.tenant_id, ln.meter, ln.period)
        self.quantity[k] = self.quantity.get(k, Decimal(0)) + ln.quantity
        self.amount[k] = self.amount.get(k, Decimal(0)) + ln.amount
        self.currency[k] = ln.currency


def _batches(s: Settings) -> Iterator[tuple[int, list[Message]]]:
    """The input topic, partition by partition in offset order, up to its end."""
    yield from kafka.partitions_to_end(s.kafka.config(), s.topics.input, batch=s.kafka.batch_size)


def recount(s: Settings) -> tuple[Totals, Stats]:
    """Source totals: the input topic rated again by the same operators, in one pass."""
    stats = Stats()
    catalog = CatalogIndex.build(load_catalog(s.process.catalog))
    validator = Validator(catalog, stats, s.limits)
    engine = ShardEngine(validator, s.engine.config(), stats)  # one engine: every tenant, no sharding needed
    totals = Totals()
    now = time.time()
    received = iso(int(now * 1000))
    for p, chunk in _batches(s):
        groups, _ = validator.route(chunk, s.topics.input, p, received, int(now * 1000), lambda _: "")
        for ln in engine.process(groups.get("", []), s.topics.input, p, now, received).lines:
            totals.add(ln)
    for ln in engine.flush_all().lines:
        totals.add(ln)
    return totals, stats


def rated_and_acknowledged(s: Settings, with_erp: bool, conflicts: list[str] | None = None) -> tuple[Totals, Totals | None]:
    """`conflicts` collects the line ids found on the topic with different contents (a crash
    replay must re-send a line byte for byte; the ERP took the first copy, so it counts)."""
    rated = Totals()
    # A line id can be on the topic more than once (a crash replay produces it again, with
    # the same content); it counts once, as it does at the ERP: the first copy.
    unique: dict[str, RatedUsageLine] = {}
    first: dict[str, bytes] = {}
    for v in read_topic(s.kafka.config(), s.topics.rated):
        ln = msgspec.json.decode(v, type=RatedUsageLine)
        seen = first.setdefault(ln.line_id, v)
        if seen is v:
            unique[ln.line_id] = ln
        elif seen != v and conflicts is not None and ln.line_id not in conflicts:
            conflicts.append(ln.line_id)
    lines = list(unique.values())
    for ln in lines:
        rated.add(ln)
    if not with_erp:
        return rated, None
    from state.ledger import Ledger

    ledger = Ledger(s.stores)
    erp = Totals()
    for i in range(0, len(lines), 1000):
        part = lines[i : i + 1000]
        for ln, st in zip(part, ledger.status("erp", [ln.line_id for ln in part]), strict=True):
            if st == "ok":
                erp.add(ln)
    return rated, erp


def compare(totals: dict[str, Totals]) -> list[dict[str, object]]:
    """One row per tenant/meter/period where the sources disagree."""
    keys = sorted(set().union(*(t.quantity for t in totals.values())))
    rows: list[dict[str, object]] = []
    for k in keys:
        q = {name: t.quantity.get(k, Decimal(0)) for name, t in totals.items()}
        a = {name: t.amount.get(k, Decimal(0)) for name, t in totals.items()}
        if len(set(q.values())) > 1 or len(set(a.values())) > 1:
            cur = next((t.currency[k] for t in totals.values() if k in t.currency), "")
            rows.append(
                {
                    "tenant": k[0],
                    "meter": k[1],
                    "period": k[2],
                    "currency": cur,
                    **{f"{n}_quantity": str(v) for n, v in q.items()},
                    **{f"{n}_amount": str(v) for n, v in a.items()},
                }
            )
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", action="store_true", help="print JSON for machines")
    ap.add_argument("--no-erp", action="store_true", help="skip the ERP-acknowledged column (no delivery ledger)")


def run(args: argparse.Namespace) -> int:
    s = load_settings()
    source, stats = recount(s)
    conflicts: list[str] = []
    rated, erp = rated_and_acknowledged(s, with_erp=not args.no_erp, conflicts=conflicts)
    totals = {"source": source, "rated": rated, **({"erp": erp} if erp is not None else {})}
    rows = compare(totals)
    summary = {
        "records": stats.records_in,
        "accepted": stats.accepted,
        "duplicates": stats.duplicates,
        "dead_letters": sum(stats.dead.values()),
        "keys": len(source.quantity),
        "differences": len(rows),
        "conflicting_copies": conflicts[:100],  # line ids on usage.rated more than once with different contents
        "amount": {
            name: {
                cur: str(sum((a for k, a in t.amount.items() if t.currency[k] == cur), Decimal(0)))
                for cur in sorted(set(t.currency.values()))
            }
            for name, t in totals.items()
        },
    }
    if args.json:
        print(json.dumps({"summary": summary, "differences": rows}, indent=2))
    else:
        cols = list(totals)
        print(f"{summary['keys']:,} tenant/meter/period totals from {stats.records_in:,} input records; compared: {', '.join(cols)}")
        for name, by_cur in summary["amount"].items():  # type: ignore[attr-defined]
            print(f"  {name:<7} " + ", ".join(f"{cur} {Decimal(v):,}" for cur, v in by_cur.items()))
        if conflicts:
            print(f"{len(conflicts)} line id(s) on {s.topics.rated} with different copies (the first counts): {', '.join(conflicts[:5])}")
        if not rows and not conflicts:
            print("OK: every tenant, meter and period agrees")
        else:
            print(f"{len(rows)} difference(s):")
            head = ["tenant", "meter", "period"] + [f"{c}_quantity" for c in cols] + [f"{c}_amount" for c in cols]
            print("  " + " | ".join(head))
            for r in rows[:200]:
                print("  " + " | ".join(str(r[h]) for h in head))
    return 1 if rows or conflicts else 0
