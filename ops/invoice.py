"""`tallyflow invoice --period YYYY-MM`: close a billing period in Tryton and prove it.

Tryton makes one customer invoice per customer and currency from the period's usage records
not yet invoiced (one line per product, quantity 1 at the exact summed amount, so Tryton's
rounding cannot move a cent; the records become read-only). Then, per customer and currency,
three totals are compared to the cent: rated (the distinct lines on the rated topic, what
`tallyflow reconcile` calls rated), in Tryton (its usage records), and invoiced (its invoices
for the period). Exits 1 when any differs: lines still in the backlog or parked in the
exceptions topic show up here as rated but not in Tryton.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from decimal import Decimal
from typing import Any

import msgspec

from ops import arguments
from runtime.kafka import read_topic
from runtime.settings import Settings, load_settings
from schemas.errors import TallyflowError
from schemas.outputs import RatedUsageLine
from sinks.tryton import TrytonClient, TrytonError

Key = tuple[str, str]  # customer (erp_customer_id), currency


def rated(s: Settings, period: str) -> dict[Key, Decimal]:
    """The period's rated total per customer and currency; a line id counts once."""
    lines: dict[str, RatedUsageLine] = {}
    for v in read_topic(s.kafka.config(), s.topics.rated):
        ln = msgspec.json.decode(v, type=RatedUsageLine)
        if ln.period == period:
            lines[ln.line_id] = ln
    out: dict[Key, Decimal] = {}
    for ln in lines.values():
        k = (ln.erp_customer_id, ln.currency)
        out[k] = out.get(k, Decimal(0)) + ln.amount
    return out


def in_tryton(client: TrytonClient, period: str) -> tuple[dict[Key, Decimal], dict[Key, Decimal], dict[str, int]]:
    """Per customer and currency: the usage records' total and the invoices' total; and counts
    (records, distinct line ids, invoices) to show that no line id is there twice."""
    recs = client.call(
        "model.tallyflow.usage.search_read",
        [("period", "=", period)],
        0,
        None,
        None,
        ["external_id", "amount", "party.code", "currency.code", "invoice_line.invoice"],
    )
    records: dict[Key, Decimal] = {}
    invoice_ids: set[int] = set()
    for r in recs:
        k = (r["party."]["code"], r["currency."]["code"])
        records[k] = records.get(k, Decimal(0)) + r["amount"]
        inv = (r.get("invoice_line.") or {}).get("invoice")
        if inv is not None:
            invoice_ids.add(inv)
    invoiced: dict[Key, Decimal] = {}
    if invoice_ids:
        invs = client.call("model.account.invoice.read", sorted(invoice_ids), ["untaxed_amount", "party.code", "currency.code", "state"])
        for inv in invs:
            if inv["state"] == "cancelled":
                continue
            k = (inv["party."]["code"], inv["currency."]["code"])
            invoiced[k] = invoiced.get(k, Decimal(0)) + inv["untaxed_amount"]
    ids = Counter(r["external_id"] for r in recs)
    counts = {"records": len(recs), "distinct_line_ids": len(ids), "invoices": len(invoice_ids)}
    return records, invoiced, counts


def compare(rated_: dict[Key, Decimal], records: dict[Key, Decimal], invoiced: dict[Key, Decimal]) -> list[dict[str, Any]]:
    rows = []
    for k in sorted(set(rated_) | set(records) | set(invoiced)):
        r, t, i = rated_.get(k, Decimal(0)), records.get(k, Decimal(0)), invoiced.get(k, Decimal(0))
        rows.append({"customer": k[0], "currency": k[1], "rated": str(r), "in_tryton": str(t), "invoiced": str(i), "ok": r == t == i})
    return rows


def by_currency(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, Decimal]] = {}
    for row in rows:
        cur = out.setdefault(row["currency"], {"rated": Decimal(0), "in_tryton": Decimal(0), "invoiced": Decimal(0)})
        for col in cur:
            cur[col] += Decimal(row[col])
    return {c: {k: str(v) for k, v in t.items()} for c, t in sorted(out.items())}


def close_period(s: Settings, period: str, *, post: bool = False, customers: list[str] | None = None) -> dict[str, Any]:
    """Invoice the period in Tryton, then compare rated, recorded and invoiced totals."""
    client = TrytonClient(s.tryton)
    try:
        created = client.call("model.tallyflow.usage.invoice_period", period, customers or None, post)
        records, invoiced, counts = in_tryton(client, period)
    except TrytonError as e:
        raise TallyflowError(f"Tryton at {s.tryton.url} ({s.tryton.database}): {e}; check TALLYFLOW_TRYTON_* and that it runs") from None
    finally:
        client.close()
    rows = compare(rated(s, period), records, invoiced)
    if customers:
        rows = [r for r in rows if r["customer"] in customers]
    return {
        "period": period,
        "invoices_created": len(created),
        **counts,
        "duplicate_line_ids": counts["records"] - counts["distinct_line_ids"],
        "by_currency": by_currency(rows),
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
            f"period {out['period']}: {out['invoices_created']} invoice(s) created; {out['records']:,} usage records in Tryton, "
            f"{out['duplicate_line_ids']} duplicate line id(s)"
        )
        print(f"  {'currency':<9}{'rated':>18}{'in Tryton':>18}{'invoiced':>18}")
        for cur, t in out["by_currency"].items():
            print(f"  {cur:<9}{Decimal(t['rated']):>18,}{Decimal(t['in_tryton']):>18,}{Decimal(t['invoiced']):>18,}")
        for r in out["differences"][:50]:
            print(f"  differs: {r['customer']} {r['currency']}: rated {r['rated']}, in Tryton {r['in_tryton']}, invoiced {r['invoiced']}")
        print(
            "OK: rated = in Tryton = invoiced for every customer" if not out["differences"] else f"{len(out['differences'])} difference(s)"
        )
    return 1 if out["differences"] or out["duplicate_line_ids"] else 0
