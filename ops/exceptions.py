"""`tallyflow exceptions`: what destinations rejected for good, and sending it again once the
cause is fixed (the customer or product created in the ERP, the CRM account mapped).

Each record of the exceptions topic holds the destination, the items as they were sent and
the reason per id. A re-drive makes the rejected ids deliverable again in the delivery ledger
and produces the items back to the topic their delivery dataflow reads (rated lines to
`usage.rated`, alerts to `usage.alerts`, invoice states the CRM refused to `erp.status`), keyed
by tenant. An invoice state parked because no tenant had its ERP customer (`erp-status`: from
the webhook or the Tryton poller) is told again once the catalog has that customer. Ids a
destination has accepted (or is sending) since are left alone, so running `--redrive` twice
is harmless; and an ERP or CRM that enforces unique ids (Tryton with the Tallyflow module)
would answer "existing" anyway.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import msgspec

from operators.catalog_index import CatalogIndex
from operators.status import status_of
from ops import arguments
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import Settings, load_settings
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER, CreditRecord, InvoiceStatus, RatedUsageLine, StatusNotice, ThresholdAlert
from sinks.erp import CREDITS
from state.ledger import Ledger


class Parked(msgspec.Struct, kw_only=True):
    """One parked request (written by `sinks.courier.Parking`)."""

    destination: str
    key: str
    ids: list[str]
    reasons: dict[str, str]
    items: list[msgspec.Raw]
    status: int | str | None = None
    response: str = ""
    at: str = ""


def load(s: Settings, destinations: list[str]) -> list[Parked]:
    out = [msgspec.json.decode(v, type=Parked) for v in read_topic(s.kafka.config(), s.topics.exceptions)]
    return [e for e in out if not destinations or e.destination in destinations]


def _item_id(dest: str, raw: msgspec.Raw) -> tuple[str, str, str]:
    """(id, tenant, topic) of a parked item."""
    if dest == "erp":
        ln = msgspec.json.decode(raw, type=RatedUsageLine)
        return ln.line_id, ln.tenant_id, "rated"
    if dest == CREDITS:
        r = msgspec.json.decode(raw, type=CreditRecord)
        return r.record_id, r.tenant_id, "credits"
    if dest == "crm-status":
        st = msgspec.json.decode(raw, type=InvoiceStatus)
        return st.status_id, st.tenant_id, "status"
    a = msgspec.json.decode(raw, type=ThresholdAlert)
    return a.alert_id, a.tenant_id, "alerts"


def summary(parked: list[Parked]) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    for e in parked:
        for why in e.reasons.values():
            reasons[f"{e.destination}: {why[:160]}"] += 1
    return {"records": len(parked), "items": sum(len(e.ids) for e in parked), "by_reason": dict(reasons.most_common(20))}


def redrive(s: Settings, parked: list[Parked]) -> dict[str, int]:
    """Re-send what is still rejected; returns counts per destination."""
    ledger = Ledger(s.stores)
    topics = {"rated": s.topics.rated, "alerts": s.topics.alerts, "credits": s.topics.credits, "status": s.topics.status}
    sent: Counter[str] = Counter()
    records: list[tuple[str, bytes, bytes | None]] = []
    seen: set[tuple[str, str]] = set()
    cat: CatalogIndex | None = None
    for e in parked:
        if e.destination == "review":  # a person rejected it: not sent again behind their back
            continue
        if e.destination == "erp-status":  # no tenant had the customer: told if the catalog has one now
            cat = cat or CatalogIndex.build(load_catalog(s.process.catalog))
            for raw in e.items:
                told = status_of(cat, msgspec.json.decode(raw, type=StatusNotice))
                if isinstance(told, InvoiceStatus) and (e.destination, told.status_id) not in seen:
                    records.append((s.topics.status, ENCODER.encode(told), told.tenant_id.encode()))
                    seen.add((e.destination, told.status_id))
                    sent[e.destination] += 1
            continue
        items = [(raw, *_item_id(e.destination, raw)) for raw in e.items]
        items = [it for it in items if (e.destination, it[1]) not in seen]
        ids = [it[1] for it in items]
        # Rejected, or forgotten by a re-drive whose produce failed: not accepted since.
        still = {i for i, st in zip(ids, ledger.status(e.destination, ids), strict=True) if st in ("rejected", None)}
        todo = [it for it in items if it[1] in still]
        ledger.forget(e.destination, [it[1] for it in todo])
        records += [(topics[topic], bytes(raw), tenant.encode()) for raw, _, tenant, topic in todo]
        seen.update((e.destination, it[1]) for it in todo)
        sent[e.destination] += len(todo)
    kafka.produce_confirmed(s.kafka.config(), records, "re-driven item(s)")
    return dict(sent)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--destination",
        action="append",
        default=[],
        help="only this destination: erp, erp-credits, crm, success, crm-status, erp-status, review (repeatable)",
    )
    ap.add_argument("--redrive", action="store_true", help="send the still-rejected items again (after fixing their cause)")


DESTINATIONS = ("erp", CREDITS, "crm", "success", "crm-status", "erp-status", "review")  # the couriers' names (sinks/*.py `name`)


def check(a: argparse.Namespace) -> None:
    arguments.one_of(a.destination, DESTINATIONS, "--destination")


def run(a: argparse.Namespace) -> int:
    s = load_settings()
    parked = load(s, a.destination)
    out = summary(parked)
    if a.redrive:
        out["redriven"] = redrive(s, parked)
    print(json.dumps(out, indent=2))
    return 0
