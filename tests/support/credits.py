"""Credit traffic for the delivery tests: grants, usage that draws on them, a lowering line
that gives back, an expiry and a void, through the rating dataflow, so the credit ledger
holds every kind of record (granted, drawn, returned, expired, voided)."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import msgspec
import orjson

from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.events import GRANTED, VOIDED
from schemas.outputs import CreditRecord, RatedUsageLine
from tests.support.events import T0, ev
from tests.support.flows import produce_events, run_bounded

S, M = timedelta(seconds=1), timedelta(minutes=1)
KINDS = {"granted", "drawn", "returned", "expired", "voided"}


def _credit_event(kind: str, tenant: str, data: dict[str, object], at: timedelta = timedelta(0)) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"{kind}-{tenant}-{data['grant_id']}",
            "source": "billing",
            "type": kind,
            "subject": tenant,
            "time": (T0 + at).isoformat().replace("+00:00", "Z"),
            "data": data,
        }
    )


def grant(tenant: str, grant_id: str, amount: str, **data: object) -> bytes:
    body = {"grant_id": grant_id, "amount": amount, "currency": "USD", "effective_at": "2026-03-01T00:00:00Z", **data}
    return _credit_event(GRANTED, tenant, body)


def void(tenant: str, grant_id: str, at: timedelta) -> bytes:
    return _credit_event(VOIDED, tenant, {"grant_id": grant_id}, at)


def traffic() -> list[bytes]:
    """acme: `a-big` drawn in full (5.00); `a-trial` drawn (9.00), partly given back by a
    lowering seats line (8.00), the rest expired. bolt: `b-1` drawn (1.50), then voided.
    Calls are 0.10 past 10 included; seats 5.00 each, 4.00 past 10 (volume)."""
    out = [
        grant("acme", "a-big", "5.00", priority=1),
        grant("acme", "a-trial", "9.00", priority=2, expires_at="2026-03-10T12:04:00Z"),
        grant("bolt", "b-1", "3.00"),
    ]
    out += [ev("acme", at=M + i * S, id=f"a1-{i}") for i in range(30)]
    out += [ev("bolt", at=M + i * S, id=f"b1-{i}") for i in range(25)]
    out += [ev("acme", "seats.updated", at=2 * M, data={"seats": 20}, id="s1")]  # 80.00
    out += [ev("acme", "seats.updated", at=3 * M, data={"seats": 18}, id="s2")]  # -8.00: gives back
    out += [ev("acme", at=5 * M + i * S, id=f"a5-{i}") for i in range(20)]
    out += [ev("bolt", at=5 * M + i * S, id=f"b5-{i}") for i in range(5)]
    out += [void("bolt", "b-1", 6 * M)]
    out += [ev("acme", at=7 * M, id="a7"), ev("bolt", at=7 * M, id="b7")]
    return out


def rate(s: Settings) -> tuple[list[RatedUsageLine], list[CreditRecord]]:
    """Run the rating dataflow over `traffic()`, one event per batch (windows close between
    batches, so bolt's line draws before the void arrives); the distinct lines and ledger
    records it wrote."""
    run_bounded(s.replace(batch_size=1), produce_events(s, traffic()))
    lines = {ln.line_id: ln for ln in (msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated))}
    records = {r.record_id: r for r in (msgspec.json.decode(v, type=CreditRecord) for v in read_topic(s.kafka.brokers, s.topics.credits))}
    assert {r.kind for r in records.values()} == KINDS, "the traffic must make every kind of credit record"
    return list(lines.values()), list(records.values())


def used_per_grant(lines: list[RatedUsageLine]) -> dict[str, Decimal]:
    """What each grant covered, from the lines' own credits."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for ln in lines:
        for c in ln.credits or ():
            out[c.grant_id] += c.amount
    return dict(out)


def applied_per_grant(records: list[dict[str, object]] | list[CreditRecord]) -> dict[str, Decimal]:
    """Drawn less returned per grant, from ledger records (as structs or as the ERP took them)."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for r in records:
        kind, gid, amount = (r.kind, r.grant_id, r.amount) if isinstance(r, CreditRecord) else (r["kind"], r["grant_id"], r["amount"])
        if kind in ("drawn", "returned"):
            out[str(gid)] += Decimal(str(amount)) * (1 if kind == "drawn" else -1)
    return dict(out)
