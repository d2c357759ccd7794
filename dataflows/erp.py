"""The ERP-delivery dataflow: usage.rated and usage.credits -> micro-batches (by size, or by
age of their first item), each kind in batches of its own -> the ERP, with backpressure:
while the ERP is down the worker waits in its sink, the backlog of both topics waits in
Kafka, and alerts (another process) are not slowed at all.

One process delivers both, so they share the ERP's rate limit and circuit breaker: rated
lines (`erp` in the delivery ledger, by `line_id`) are the gross charges; the credit
ledger's records (`erp-credits`, by `record_id`) are what prepaid grants took off them.

Review before posting (SPEC §10.1): an item rated with `review` set goes to `usage.review`
instead, and waits for a person; their decisions on `usage.audit` come back here, the
approved item to its courier, the rejected one parked (sinks/review.py).

Run: `tallyflow deliver erp`, or `python -m bytewax.run "dataflows.erp:get_flow()"`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow

from connectors.delivery import Batcher, Route, RoutedCourierSink, message_values, share_remote
from connectors.kafka_source import KafkaBatchSource
from dataflows.alerts import DELIVERY_PREFETCH
from runtime import kafka, process
from runtime.settings import Settings, load_settings
from schemas.outputs import CreditRecord, RatedUsageLine, ReviewDecision
from sinks import destinations
from sinks.base import Destination
from sinks.courier import Courier, Parking, ledger_problem
from sinks.erp import ErpCreditsHttp
from sinks.review import ReviewDesk
from sinks.tryton import EntityCompanies, TrytonErpCredits
from state.ledger import Ledger

LINES, CREDITS = "erp", "credits"  # the batcher's keys: one batch never mixes the kinds
HELD_LINES, HELD_CREDITS, REJECTED = "held-lines", "held-credits", "rejected"  # the review desk's
_LINE = msgspec.json.Decoder(RatedUsageLine)
_CREDIT = msgspec.json.Decoder(CreditRecord)
_DECISION = msgspec.json.Decoder(ReviewDecision)


def _describe(key: str, lines: Sequence[RatedUsageLine]) -> dict[str, Any]:
    return {"batch_id": key, "lines": len(lines), "line_ids": [ln.line_id for ln in lines]}


def _describe_credits(key: str, records: Sequence[CreditRecord]) -> dict[str, Any]:
    return {"batch_id": key, "records": len(records), "record_ids": [r.record_id for r in records]}


def credit_destination(s: Settings) -> Destination[CreditRecord]:
    """The credit records go where the lines go (`TALLYFLOW_ERP_KIND`)."""
    if s.erp.kind == "tryton":
        return TrytonErpCredits(s.tryton, companies=EntityCompanies(s.process.catalog))
    return ErpCreditsHttp(s.erp, s.delivery.sink_timeout_seconds)


def courier(s: Settings, parking: Parking | None = None, ledger: Ledger | None = None) -> Courier[RatedUsageLine]:
    return Courier(
        destinations.erp(s),
        RatedUsageLine,
        lambda ln: ln.line_id,
        rate_per_second=s.erp.rate_per_second,
        policy=s.delivery,
        ledger=ledger or Ledger(s.stores),
        parking=parking or Parking(kafka.producer(s.kafka.config()), s.topics.exceptions),
        batched=True,
        logged=("erp batch posted", "erp batch rejected"),
        describe=_describe,
    )


def routes(s: Settings) -> dict[str, Route]:
    """The lines' courier and the credit records' beside it, one remote between them."""
    parking = Parking(kafka.producer(s.kafka.config()), s.topics.exceptions)
    ledger = Ledger(s.stores)
    lines = courier(s, parking, ledger)
    credits: Courier[CreditRecord] = Courier(
        credit_destination(s),
        CreditRecord,
        lambda r: r.record_id,
        rate_per_second=s.erp.rate_per_second,
        policy=s.delivery,
        ledger=ledger,
        parking=parking,
        batched=True,
        logged=("erp credit batch posted", "erp credit batch rejected"),
        describe=_describe_credits,
    )
    share_remote(lines, credits)
    return {
        LINES: (lines, lambda vs: [_LINE.decode(v) for v in vs]),
        CREDITS: (credits, lambda vs: [_CREDIT.decode(v) for v in vs]),
    }


class _Hold:
    """Held items of one kind (line, credit) to the review topic."""

    def __init__(self, desk: ReviewDesk, kind: str) -> None:
        self.desk, self.kind = desk, kind

    def deliver(self, items: Sequence[bytes]) -> None:
        self.desk.hold([(self.kind, v) for v in items])

    def close(self) -> None:
        self.desk.close()


class _Reject:
    """Rejected decisions: their items parked on the exceptions topic."""

    def __init__(self, desk: ReviewDesk) -> None:
        self.desk = desk

    def deliver(self, items: Sequence[ReviewDecision]) -> None:
        self.desk.reject(items)

    def close(self) -> None:
        self.desk.close()


def _held(value: bytes) -> bool:
    """Whether a line or credit record is held for review (SPEC §10.1): its `review` is set.
    The substring test spares decoding every item; a dimension named `review` is told apart
    by decoding the few that have it."""
    return b'"review":' in value and _REVIEW.decode(value).review is not None


class _Review(msgspec.Struct):
    review: str | None = None


_REVIEW = msgspec.json.Decoder(_Review)


def _decided(value: bytes) -> list[tuple[str, bytes]]:
    """A decision on `usage.audit`: an approved item goes to its courier (posted once: the
    delivery ledger knows its id, whatever replays), a rejected one to be parked."""
    d = _DECISION.decode(value)
    if d.decision == "reject":
        return [(REJECTED, value)]
    return [(LINES if d.kind == "line" else CREDITS, bytes(d.item))]


def all_routes(s: Settings) -> dict[str, Route]:
    """The ERP's couriers, and the review desk's steps beside them."""
    desk = ReviewDesk(s)
    return {
        **routes(s),
        HELD_LINES: (_Hold(desk, "line"), list),
        HELD_CREDITS: (_Hold(desk, "credit"), list),
        REJECTED: (_Reject(desk), lambda vs: [_DECISION.decode(v) for v in vs]),
    }


def build_flow(
    s: Settings,
    *,
    end_offsets: Mapping[int, int] | None = None,
    credit_end_offsets: Mapping[int, int] | None = None,
    audit_end_offsets: Mapping[int, int] | None = None,
) -> Dataflow:
    """`end_offsets` bounds the rated topic, `credit_end_offsets` the credit ledger and
    `audit_end_offsets` the review decisions (bounded with the lines and not given: nothing
    of them is read).

    Items held for review (their `review` set where they were rated) go to the review topic
    in batches of their own, never to the ERP, and hold nothing else back: other items, of
    the same tenant too, flow on. A decision on the audit topic sends the approved item to its
    courier and parks the rejected one."""
    flow = Dataflow("tallyflow-erp-delivery")
    cfg = msgspec.structs.replace(s.kafka, start_from="earliest")
    if end_offsets is not None:
        credit_end_offsets = {} if credit_end_offsets is None else credit_end_offsets
        audit_end_offsets = {} if audit_end_offsets is None else audit_end_offsets
    rated = KafkaBatchSource(cfg, s.topics.rated, label="erp", end_offsets=end_offsets, client=DELIVERY_PREFETCH)
    ledger = KafkaBatchSource(cfg, s.topics.credits, label="erp", end_offsets=credit_end_offsets, client=DELIVERY_PREFETCH)
    audit = KafkaBatchSource(cfg, s.topics.audit, label="erp", end_offsets=audit_end_offsets, client=DELIVERY_PREFETCH)
    line_values = op.branch("held-lines", op.flat_map("lines", op.input("rated", flow, rated), message_values), _held)
    record_values = op.branch("held-records", op.flat_map("records", op.input("credits", flow, ledger), message_values), _held)
    lines = op.map("key-lines", line_values.falses, lambda v: (LINES, v))
    records = op.map("key-records", record_values.falses, lambda v: (CREDITS, v))
    held = op.merge(
        "held",
        op.map("key-held-lines", line_values.trues, lambda v: (HELD_LINES, v)),
        op.map("key-held-records", record_values.trues, lambda v: (HELD_CREDITS, v)),
    )
    decided = op.flat_map("decided", op.flat_map("decisions", op.input("audit", flow, audit), message_values), _decided)
    max_items, max_age = s.erp.batch_max_lines, s.erp.batch_max_latency_seconds
    line_batches = op.stateful_batch("batch", lines, lambda resume: Batcher(max_items, max_age, resume))
    record_batches = op.stateful_batch("batch-credits", records, lambda resume: Batcher(max_items, max_age, resume, pending=None))
    review_batches = op.stateful_batch(
        "batch-review", op.merge("review", held, decided), lambda resume: Batcher(max_items, max_age, resume, pending=None)
    )
    batches = op.merge("batches", line_batches, record_batches, review_batches)
    op.output("post", batches, RoutedCourierSink(lambda: all_routes(s), "erp"))
    return flow


def get_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.erp:get_flow()"`."""
    process.refuse_worker_threads("deliver erp")
    s = load_settings()
    flow = build_flow(s)
    process.started(s, "erp", ledger=ledger_problem)
    return flow
