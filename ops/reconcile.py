"""`tallyflow reconcile`: per tenant, meter and billing period, compare

* source totals — recounted from the input topic with the rating rules (validation,
  dedup, lateness, pricing) in one plain pass, outside any dataflow;
* rated totals — the sum of `usage.rated` (originals and corrections; a line id on the topic
  twice counts once, its first copy, as at the ERP; copies that differ are reported);
* ERP-acknowledged totals — the rated lines the delivery ledger records as accepted.

and per tenant, billing period and currency the money (SPEC §9.7): gross (Σ line amounts,
true-ups included), credits applied (Σ drawn − Σ returned) and net = gross − credits,

* rated — from the lines on `usage.rated` (their `credits`);
* ledger — the credits from the credit ledger topic's drawn and returned records (a record
  id once, its first copy);
* ERP — the gross of the lines and the credits of the records the delivery ledger records
  as accepted (`erp` by line id, `erp-credits` by record id): what the ERP books.

Prints a table of the differences (or a one-line OK) and exits 1 when anything differs.
The recount reads each partition in order; it matches the live pipeline when each tenant's
events share a partition (producers key by tenant), as the spec asks them to.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

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
from schemas.outputs import CreditRecord, RatedUsageLine
from sinks.erp import CREDITS
from state.review import decisions

Key = tuple[str, str, str]  # tenant, meter, period
MoneyKey = tuple[str, str, str]  # tenant, period, currency
SOURCES = ("source", "rated", "erp")
T = TypeVar("T")
ZERO = Decimal(0)


@dataclass
class Totals:
    quantity: dict[Key, Decimal] = field(default_factory=dict)
    amount: dict[Key, Decimal] = field(default_factory=dict)
    currency: dict[Key, str] = field(default_factory=dict)
    # Per tenant, period and currency: gross, and credits applied (drawn > 0, given back < 0).
    gross: dict[MoneyKey, Decimal] = field(default_factory=dict)
    credits: dict[MoneyKey, Decimal] = field(default_factory=dict)
    entity: dict[MoneyKey, str] = field(default_factory=dict)  # the tenant's legal entity, where the catalog has entities

    def add(self, ln: RatedUsageLine, *, credits: bool = True) -> None:
        """A line's quantity and amount, and (`credits`) the credits it carries."""
        k = (ln.tenant_id, ln.meter, ln.period)
        self.quantity[k] = self.quantity.get(k, ZERO) + ln.quantity
        self.amount[k] = self.amount.get(k, ZERO) + ln.amount
        self.currency[k] = ln.currency
        m = (ln.tenant_id, ln.period, ln.currency)
        self.gross[m] = self.gross.get(m, ZERO) + ln.amount
        if ln.legal_entity is not None:
            self.entity[m] = ln.legal_entity
        if credits and ln.credits:
            self.credits[m] = self.credits.get(m, ZERO) + sum((c.amount for c in ln.credits), ZERO)

    def add_record(self, r: CreditRecord) -> None:
        """A credit ledger record: drawn takes off the invoice, returned gives back; the
        grant-level kinds (granted, expired, voided) move no invoice."""
        if r.kind not in ("drawn", "returned") or r.period is None:
            return
        m = (r.tenant_id, r.period, r.currency)
        self.credits[m] = self.credits.get(m, ZERO) + (r.amount if r.kind == "drawn" else -r.amount)


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


def first_copies(values: Iterable[bytes], kind: type[T], id_of: Callable[[T], str], conflicts: list[str] | None) -> list[T]:
    """Each id's first copy, in topic order, as the ERP took it; `conflicts` collects the ids
    whose later copies differ (a crash replay must send an item again byte for byte)."""
    first: dict[str, bytes] = {}
    out: list[T] = []
    for v in values:
        x = msgspec.json.decode(v, type=kind)
        k = id_of(x)
        seen = first.setdefault(k, v)
        if seen is v:
            out.append(x)
        elif seen != v and conflicts is not None and k not in conflicts:
            conflicts.append(k)
    return out


def rejected_in_review(s: Settings) -> set[str]:
    """The review ids a person rejected (`usage.audit`): never posted, by decision."""
    return {i for i, d in decisions(s).items() if d.decision == "reject"}


def rated_and_acknowledged(
    s: Settings,
    with_erp: bool,
    conflicts: list[str] | None = None,
    rejected: set[str] | None = None,
    review: dict[str, Totals] | None = None,
) -> tuple[Totals, Totals | None]:
    """`conflicts` collects the line ids found on the topic with different contents (a crash
    replay must re-send a line byte for byte; the ERP took the first copy, so it counts).

    The ERP column is what the ERP booked plus what review keeps from it (SPEC §10.1:
    rated = ERP + held + rejected): a line held for review and not posted counts as `held`,
    or as `rejected` once a person rejected it; `review` collects those two apart."""
    rated = Totals()
    # A line id can be on the topic more than once (a crash replay produces it again, with
    # the same content); it counts once, as it does at the ERP: the first copy.
    lines = first_copies(read_topic(s.kafka.config(), s.topics.rated), RatedUsageLine, lambda ln: ln.line_id, conflicts)
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
                erp.add(ln, credits=False)  # the ERP's credits are the credit records it took
            elif ln.review is not None:
                erp.add(ln, credits=False)
                if review is not None:
                    column = "rejected" if rejected and ln.line_id in rejected else "held"
                    review.setdefault(column, Totals()).add(ln, credits=False)
    return rated, erp


def credit_ledger(s: Settings, with_erp: bool, conflicts: list[str] | None = None) -> tuple[Totals, Totals | None]:
    """The credits applied on the credit ledger topic, and those of its records the ERP
    acknowledged. A record id counts once, its first copy (a crash replay re-sends a line's
    draws under the same ids); `conflicts` collects the record ids whose copies differ."""
    records = first_copies(read_topic(s.kafka.config(), s.topics.credits), CreditRecord, lambda r: r.record_id, conflicts)
    topic = Totals()
    for r in records:
        topic.add_record(r)
    if not with_erp:
        return topic, None
    from state.ledger import Ledger

    ledger = Ledger(s.stores)
    erp = Totals()
    for i in range(0, len(records), 1000):
        part = records[i : i + 1000]
        for r, st in zip(part, ledger.status(CREDITS, [r.record_id for r in part]), strict=True):
            if st == "ok" or r.review is not None:  # booked, or kept from the ERP by review (as its line)
                erp.add_record(r)
    return topic, erp


def money_columns(rated: Totals, ledger: Totals, erp: Totals | None) -> dict[str, tuple[dict[MoneyKey, Decimal], dict[MoneyKey, Decimal]]]:
    """(gross, credits) per column; the ledger topic has credits only."""
    cols = {"rated": (rated.gross, rated.credits), "ledger": ({}, ledger.credits)}
    if erp is not None:
        cols["erp"] = (erp.gross, erp.credits)
    return cols


def compare_money(rated: Totals, ledger: Totals, erp: Totals | None) -> list[dict[str, object]]:
    """One row per tenant, period and currency where gross, credits or net disagree:
    gross rated = ERP, credits rated (on the lines) = ledger topic = ERP (its records)."""
    cols = money_columns(rated, ledger, erp)
    keys = sorted(set().union(*(set(g) | set(c) for g, c in cols.values())))
    rows: list[dict[str, object]] = []
    for k in keys:
        gross = {n: g.get(k, ZERO) for n, (g, _) in cols.items() if n != "ledger"}
        credits = {n: c.get(k, ZERO) for n, (_, c) in cols.items()}
        if len(set(gross.values())) > 1 or len(set(credits.values())) > 1:
            row: dict[str, object] = {"tenant": k[0], "period": k[1], "currency": k[2]}
            for n in cols:
                if n in gross:
                    row[f"{n}_gross"] = str(gross[n])
                row[f"{n}_credits"] = str(credits[n])
                if n in gross:
                    row[f"{n}_net"] = str(gross[n] - credits[n])
            rows.append(row)
    return rows


def money_summary(rated: Totals, ledger: Totals, erp: Totals | None) -> dict[str, dict[str, dict[str, str]]]:
    """Per column and currency: gross, credits, net (the ledger topic: credits)."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for n, (g, c) in money_columns(rated, ledger, erp).items():
        by: dict[str, dict[str, Decimal]] = {}
        for k, v in g.items():
            acc = by.setdefault(k[2], {"gross": ZERO, "credits": ZERO})
            acc["gross"] += v
        for k, v in c.items():
            acc = by.setdefault(k[2], {"gross": ZERO, "credits": ZERO})
            acc["credits"] += v
        out[n] = {
            cur: {"credits": str(t["credits"])}
            if n == "ledger"
            else {"gross": str(t["gross"]), "credits": str(t["credits"]), "net": str(t["gross"] - t["credits"])}
            for cur, t in sorted(by.items())
        }
    return out


def by_entity(rated: Totals, erp: Totals | None) -> dict[str, dict[str, dict[str, str]]]:
    """Per legal entity and currency (SPEC §10.2): gross, credits and net rated, and what the
    ERP books (with review's held and rejected, as in the ERP column). Tenants belong to one
    entity, so the per-tenant comparison holds per entity too; this is what each company sees."""
    cols = [("rated", rated)] + ([("erp", erp)] if erp is not None else [])
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, t in cols:
        acc: dict[tuple[str, str], list[Decimal]] = {}
        for k in set(t.gross) | set(t.credits):
            entity = rated.entity.get(k)
            if entity is None:
                continue
            a = acc.setdefault((entity, k[2]), [ZERO, ZERO])
            a[0] += t.gross.get(k, ZERO)
            a[1] += t.credits.get(k, ZERO)
        for (entity, cur), (g, c) in sorted(acc.items()):
            out.setdefault(entity, {})[f"{name} {cur}"] = {"gross": str(g), "credits": str(c), "net": str(g - c)}
    return out


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
    credit_conflicts: list[str] = []
    rejected = rejected_in_review(s)
    review: dict[str, Totals] = {}
    rated, erp = rated_and_acknowledged(s, with_erp=not args.no_erp, conflicts=conflicts, rejected=rejected, review=review)
    ledger, erp_credits = credit_ledger(s, with_erp=not args.no_erp, conflicts=credit_conflicts)
    if erp is not None and erp_credits is not None:
        erp.credits = erp_credits.credits
    totals = {"source": source, "rated": rated, **({"erp": erp} if erp is not None else {})}
    rows = compare(totals)
    money_rows = compare_money(rated, ledger, erp)
    summary = {
        "records": stats.records_in,
        "accepted": stats.accepted,
        "duplicates": stats.duplicates,
        "dead_letters": sum(stats.dead.values()),
        "keys": len(source.quantity),
        "differences": len(rows),
        "money_differences": len(money_rows),
        "conflicting_copies": conflicts[:100],  # line ids on usage.rated more than once with different contents
        "conflicting_credit_copies": credit_conflicts[:100],  # record ids on the credit ledger likewise
        "amount": {
            name: {
                cur: str(sum((a for k, a in t.amount.items() if t.currency[k] == cur), Decimal(0)))
                for cur in sorted(set(t.currency.values()))
            }
            for name, t in {**totals, **review}.items()
        },
        "money": money_summary(rated, ledger, erp),  # per column and currency: gross, credits, net
        "entities": by_entity(rated, erp),  # per legal entity and currency (catalogs with entities)
    }
    failed = bool(rows or conflicts or money_rows or credit_conflicts)
    if args.json:
        print(json.dumps({"summary": summary, "differences": rows, "money_differences": money_rows}, indent=2))
        return 1 if failed else 0
    cols = list(totals)
    print(f"{summary['keys']:,} tenant/meter/period totals from {stats.records_in:,} input records; compared: {', '.join(cols)}")
    for name, by_cur in summary["amount"].items():  # type: ignore[attr-defined]
        label = f"  of which {name} for review" if name in review else f"  {name:<7}"
        print(f"{label} " + ", ".join(f"{cur} {Decimal(v):,}" for cur, v in by_cur.items()))
    print("money per tenant, period and currency (gross - credits applied = net):")
    for name, by_cur in summary["money"].items():  # type: ignore[attr-defined]
        shown = [
            f"{cur} credits {Decimal(t['credits']):,}"
            if name == "ledger"
            else f"{cur} {Decimal(t['gross']):,} - {Decimal(t['credits']):,} = {Decimal(t['net']):,}"
            for cur, t in by_cur.items()
        ]
        print(f"  {name:<7} " + (", ".join(shown) or "nothing"))
    for entity, cols_of in summary["entities"].items():  # type: ignore[attr-defined]
        shown = [f"{col} {Decimal(t['gross']):,} - {Decimal(t['credits']):,} = {Decimal(t['net']):,}" for col, t in cols_of.items()]
        print(f"  entity {entity}: " + "; ".join(shown))
    if conflicts:
        print(f"{len(conflicts)} line id(s) on {s.topics.rated} with different copies (the first counts): {', '.join(conflicts[:5])}")
    if credit_conflicts:
        print(
            f"{len(credit_conflicts)} record id(s) on {s.topics.credits} with different copies (the first counts): "
            + ", ".join(credit_conflicts[:5])
        )
    if not failed:
        print("OK: every tenant, meter and period agrees, and gross, credits and net per tenant, period and currency")
        return 0
    if rows:
        print(f"{len(rows)} difference(s):")
        head = ["tenant", "meter", "period"] + [f"{c}_quantity" for c in cols] + [f"{c}_amount" for c in cols]
        print("  " + " | ".join(head))
        for r in rows[:200]:
            print("  " + " | ".join(str(r[h]) for h in head))
    if money_rows:
        print(f"{len(money_rows)} money difference(s) per tenant, period and currency:")
        head = list(money_rows[0])
        print("  " + " | ".join(head))
        for mr in money_rows[:200]:
            print("  " + " | ".join(str(mr[h]) for h in head))
    return 1
