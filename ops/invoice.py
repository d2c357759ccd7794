"""`tallyflow invoice --period YYYY-MM`: close a billing period in Tryton and prove it.

Tryton makes one customer invoice per company (each legal entity's, SPEC §10.2), customer and
currency from the period's usage records
and credit records not yet invoiced: one line per product (quantity 1 at the exact summed
amount, so Tryton's rounding cannot move a cent) and one negative line per prepaid grant used
(its drawn less its returned records); the records become read-only. Then, per legal entity,
customer and currency, it checks to the cent (a record under another company than its
entity's is a difference):

* gross: rated (the distinct lines on the rated topic, what `tallyflow reconcile` calls
  rated) = in Tryton (its usage records);
* credits applied: on the rated lines (their `credits`) = on the credit ledger topic (drawn
  less returned records) = in Tryton (its credit records);
* net: gross - credits = invoiced (the untaxed total of the period's invoices).

Exits 1 when any differs: lines or credit records still in the backlog or parked in the
exceptions topic show up here as rated but not in Tryton, and so do those still held for
review (`held` counts them; decide them with `tallyflow review`). Items a person rejected in
review are not billed and not counted. `rated`, `in_tryton` and `invoiced` are the net
amounts (what the invoices must total); with no credits, the gross.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from ops import arguments
from runtime.kafka import read_topic
from runtime.settings import Settings, load_settings
from schemas.catalog import load_catalog
from schemas.errors import TallyflowError
from schemas.outputs import CreditRecord, RatedUsageLine
from sinks.tryton import TrytonClient, TrytonError
from state.review import decisions

Key = tuple[str, str, str]  # legal entity ("" without entities), customer (erp_customer_id), currency
ZERO = Decimal(0)
INVOICE_TIMEOUT_S = 900.0
COLUMNS = ("rated_gross", "rated_credits", "ledger_credits", "tryton_gross", "tryton_credits", "rated", "in_tryton", "invoiced")


def _add(into: dict[Key, Decimal], k: Key, v: Decimal) -> None:
    into[k] = into.get(k, ZERO) + v


@dataclass
class Rated:
    """What Tallyflow rated for the period, per customer and currency."""

    gross: dict[Key, Decimal] = field(default_factory=dict)  # Σ line amounts
    credits: dict[Key, Decimal] = field(default_factory=dict)  # Σ the lines' credits (drawn > 0, given back < 0)
    ledger: dict[Key, Decimal] = field(default_factory=dict)  # Σ drawn - Σ returned on the credit ledger topic
    held: int = 0  # lines and credit records of the period waiting for a review decision


def rated(s: Settings, period: str) -> Rated:
    """The period's rated gross and credits; a line id and a record id count once (first copy).
    What a person rejected in review is left out (never billed); what waits is counted."""
    decided = {i: d.decision for i, d in decisions(s).items()}
    out = Rated()

    def billed(item_id: str, review: str | None) -> bool:
        if review is None or decided.get(item_id) == "approve":
            return True
        if item_id not in decided:
            out.held += 1
            return True  # rated, not in Tryton yet: a difference until decided
        return False

    lines: dict[str, RatedUsageLine] = {}
    for v in read_topic(s.kafka.config(), s.topics.rated):
        ln = msgspec.json.decode(v, type=RatedUsageLine)
        if ln.period == period:
            lines.setdefault(ln.line_id, ln)
    for ln in lines.values():
        k = (ln.legal_entity or "", ln.erp_customer_id, ln.currency)
        if billed(ln.line_id, ln.review):
            _add(out.gross, k, ln.amount)
            _add(out.credits, k, sum((c.amount for c in ln.credits or ()), ZERO))
    records: dict[str, CreditRecord] = {}
    for v in read_topic(s.kafka.config(), s.topics.credits):
        r = msgspec.json.decode(v, type=CreditRecord)
        if r.period == period and r.kind in ("drawn", "returned"):
            records.setdefault(r.record_id, r)
    for r in records.values():
        if billed(r.record_id, r.review):
            _add(out.ledger, (r.legal_entity or "", r.erp_customer_id, r.currency), r.amount if r.kind == "drawn" else -r.amount)
    return out


@dataclass
class InTryton:
    """What Tryton holds for the period, per customer and currency."""

    gross: dict[Key, Decimal] = field(default_factory=dict)  # its usage records
    credits: dict[Key, Decimal] = field(default_factory=dict)  # its drawn less returned credit records
    invoiced: dict[Key, Decimal] = field(default_factory=dict)  # its invoices' untaxed totals
    counts: dict[str, int] = field(default_factory=dict)


def entity_of(companies: dict[str, str]) -> Callable[[dict[str, Any]], str]:
    """A Tryton record's legal entity, from its company (read as `company.party.code` and
    `.name`): the entity whose `erp_company` that is; "" when the catalog declares none, and
    the company's own name, which no rated line carries, when it is no entity's."""

    def of(record: dict[str, Any]) -> str:
        if not companies:
            return ""
        party = (record.get("company.") or {}).get("party.") or {}
        for key in (party.get("code"), party.get("name")):
            if key in companies:
                return companies[key]
        return f"(company {party.get('name')})"

    return of


COMPANY = ["company.party.code", "company.party.name"]


def in_tryton(client: TrytonClient, period: str, entity: Callable[[dict[str, Any]], str] = lambda r: "") -> InTryton:
    """Usage records, credit records and the invoices they are on; and counts (records,
    distinct ids, invoices) to show that no line or record id is there twice."""
    out = InTryton()
    recs = client.call(
        "model.tallyflow.usage.search_read",
        [("period", "=", period)],
        0,
        None,
        None,
        ["external_id", "amount", "party.code", "currency.code", "invoice_line.invoice", *COMPANY],
    )
    invoice_ids: set[int] = set()
    for r in recs:
        _add(out.gross, (entity(r), r["party."]["code"], r["currency."]["code"]), r["amount"])
        inv = (r.get("invoice_line.") or {}).get("invoice")
        if inv is not None:
            invoice_ids.add(inv)
    credits = client.call(
        "model.tallyflow.credit.search_read",
        [("period", "=", period), ("kind", "in", ["drawn", "returned"])],
        0,
        None,
        None,
        ["external_id", "kind", "amount", "party.code", "currency.code", "invoice", *COMPANY],
    )
    for c in credits:
        k = (entity(c), c["party."]["code"], c["currency."]["code"])
        _add(out.credits, k, c["amount"] if c["kind"] == "drawn" else -c["amount"])
        if c.get("invoice") is not None:
            invoice_ids.add(c["invoice"])
    if invoice_ids:
        fields = ["untaxed_amount", "party.code", "currency.code", "state", *COMPANY]
        for inv in client.call("model.account.invoice.read", sorted(invoice_ids), fields):
            if inv["state"] != "cancelled":
                _add(out.invoiced, (entity(inv), inv["party."]["code"], inv["currency."]["code"]), inv["untaxed_amount"])
    out.counts = {
        "records": len(recs),
        "distinct_line_ids": len(Counter(r["external_id"] for r in recs)),
        "credit_records": len(credits),
        "distinct_record_ids": len(Counter(c["external_id"] for c in credits)),
        "invoices": len(invoice_ids),
    }
    return out


def compare(r: Rated, t: InTryton) -> list[dict[str, Any]]:
    """One row per customer and currency: every column, and whether they agree."""
    rows = []
    for k in sorted(set(r.gross) | set(r.credits) | set(r.ledger) | set(t.gross) | set(t.credits) | set(t.invoiced)):
        v = {
            "rated_gross": r.gross.get(k, ZERO),
            "rated_credits": r.credits.get(k, ZERO),
            "ledger_credits": r.ledger.get(k, ZERO),
            "tryton_gross": t.gross.get(k, ZERO),
            "tryton_credits": t.credits.get(k, ZERO),
            "invoiced": t.invoiced.get(k, ZERO),
        }
        v["rated"] = v["rated_gross"] - v["rated_credits"]
        v["in_tryton"] = v["tryton_gross"] - v["tryton_credits"]
        ok = (
            v["rated_gross"] == v["tryton_gross"]
            and v["rated_credits"] == v["ledger_credits"] == v["tryton_credits"]
            and v["rated"] == v["in_tryton"] == v["invoiced"]
        )
        rows.append({"entity": k[0], "customer": k[1], "currency": k[2], **{c: str(v[c]) for c in COLUMNS}, "ok": ok})
    return rows


def totals_by(rows: list[dict[str, Any]], *keys: str) -> dict[str, dict[str, str]]:
    """Every column summed per value of `keys` (joined with "/")."""
    out: dict[str, dict[str, Decimal]] = {}
    for row in rows:
        cur = out.setdefault("/".join(row[k] for k in keys), dict.fromkeys(COLUMNS, ZERO))
        for col in cur:
            cur[col] += Decimal(row[col])
    return {c: {k: str(v) for k, v in t.items()} for c, t in sorted(out.items())}


def close_period(s: Settings, period: str, *, post: bool = False, customers: list[str] | None = None) -> dict[str, Any]:
    """Invoice the period in Tryton, then compare rated, recorded and invoiced totals."""
    companies = {e.erp_company: e.id for e in load_catalog(s.process.catalog).entities}
    # One transaction invoices (and posts) the whole period: minutes for thousands of
    # invoices on a small Tryton, so the call may take longer than an ingest's timeout.
    client = TrytonClient(s.tryton, timeout_s=max(s.tryton.timeout_seconds, INVOICE_TIMEOUT_S))
    try:
        created = client.call("model.tallyflow.usage.invoice_period", period, customers or None, post)
        held = in_tryton(client, period, entity_of(companies))
    except TrytonError as e:
        raise TallyflowError(f"Tryton at {s.tryton.url} ({s.tryton.database}): {e}; check TALLYFLOW_TRYTON_* and that it runs") from None
    finally:
        client.close()
    r = rated(s, period)
    rows = compare(r, held)
    if customers:
        rows = [r for r in rows if r["customer"] in customers]
    counts = held.counts
    return {
        "period": period,
        "invoices_created": len(created),
        **counts,
        "duplicate_line_ids": counts["records"] - counts["distinct_line_ids"],
        "duplicate_record_ids": counts["credit_records"] - counts["distinct_record_ids"],
        "by_currency": totals_by(rows, "currency"),
        "by_entity": totals_by(rows, "entity", "currency") if companies else {},
        "held_for_review": r.held,
        "differences": [r for r in rows if not r["ok"]],
        "customers": len(rows),
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--period", required=True, help="the billing period to close, YYYY-MM (YYYY-MM-DD for plans billed daily)")
    ap.add_argument("--customer", action="append", default=[], help="only this erp_customer_id (repeatable)")
    ap.add_argument("--post", action="store_true", help="post the invoices (numbered, final); default: leave them draft")
    ap.add_argument("--json", action="store_true", help="print JSON for machines")


def check(a: argparse.Namespace) -> None:
    """Before Tryton or the brokers are asked: a period the catalog's plans bill by, customers of the catalog."""
    s = load_settings()
    cat = arguments.catalog(s)
    arguments.customers(cat, a.customer)
    arguments.periods(cat, [a.period], max_future_seconds=s.limits.max_future_seconds)


def run(a: argparse.Namespace) -> int:
    s = load_settings()
    out = close_period(s, a.period, post=a.post, customers=a.customer)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"period {out['period']}: {out['invoices_created']} invoice(s) created; {out['records']:,} usage records and "
            f"{out['credit_records']:,} credit records in Tryton, {out['duplicate_line_ids']} duplicate line id(s), "
            f"{out['duplicate_record_ids']} duplicate record id(s)"
        )
        table = out["by_entity"] or out["by_currency"]
        label = "entity/currency" if out["by_entity"] else "currency"
        print(f"  {label:<16}{'gross':>16}{'credits':>14}{'net rated':>16}{'in Tryton':>16}{'invoiced':>16}")
        for key, t in table.items():
            gross, cr = Decimal(t["rated_gross"]), Decimal(t["rated_credits"])
            net, held, inv = Decimal(t["rated"]), Decimal(t["in_tryton"]), Decimal(t["invoiced"])
            print(f"  {key:<16}{gross:>16,}{cr:>14,}{net:>16,}{held:>16,}{inv:>16,}")
        if out["held_for_review"]:
            print(f"  {out['held_for_review']:,} line(s) or credit record(s) wait for review: decide them (tallyflow review list)")
        for r in out["differences"][:50]:
            where = f"{r['entity']} " if r["entity"] else ""
            print(
                f"  differs: {where}{r['customer']} {r['currency']}: gross rated {r['rated_gross']}, in Tryton {r['tryton_gross']}; "
                f"credits on lines {r['rated_credits']}, on the ledger {r['ledger_credits']}, in Tryton {r['tryton_credits']}; "
                f"net rated {r['rated']}, invoiced {r['invoiced']}"
            )
        print(
            "OK: gross - credits = invoiced, rated = in Tryton, for every customer"
            if not out["differences"]
            else f"{len(out['differences'])} difference(s)"
        )
    return 1 if out["differences"] or out["duplicate_line_ids"] or out["duplicate_record_ids"] else 0
