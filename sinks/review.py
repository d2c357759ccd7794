"""The review desk of the ERP delivery (SPEC §10.1): a line or credit record held for review
goes to `usage.review` instead of the ERP, keyed by tenant, with its reason; a rejected one
(a decision on `usage.audit`) is parked on `usage.exceptions`, where `tallyflow exceptions`
shows it. Both write through the Kafka outbox and flush before returning, so the batch that
carried them is only behind the next recovery snapshot once the broker has them (a replay
may write one again: readers count a review id once)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from operators.periods import iso
from runtime.settings import Settings
from schemas.outputs import ENCODER, CreditRecord, HeldItem, RatedUsageLine, ReviewDecision
from sinks.courier import parked
from sinks.kafka import KafkaOutbox

_LINE = msgspec.json.Decoder(RatedUsageLine)
_CREDIT = msgspec.json.Decoder(CreditRecord)


def held(kind: str, value: bytes, at_ms: int) -> HeldItem:
    """The held item of a line (`kind` line) or credit record (`credit`) as rated."""
    x: RatedUsageLine | CreditRecord = _LINE.decode(value) if kind == "line" else _CREDIT.decode(value)
    return HeldItem(
        review_id=x.line_id if isinstance(x, RatedUsageLine) else x.record_id,
        kind="line" if kind == "line" else "credit",
        tenant_id=x.tenant_id,
        period=x.period,
        amount=x.amount,
        currency=x.currency,
        reason=x.review or "",
        held_at=iso(at_ms),
        item=msgspec.Raw(value),
    )


class ReviewDesk:
    """Held items to the review topic; rejected ones to the exceptions topic."""

    def __init__(self, s: Settings) -> None:
        self.out = KafkaOutbox(s.kafka.config())
        self.review, self.exceptions = s.topics.review, s.topics.exceptions

    def hold(self, items: Sequence[tuple[str, bytes]]) -> None:
        now = int(time.time() * 1000)
        records = []
        for kind, value in items:
            h = held(kind, value, now)
            records.append((self.review, h.tenant_id.encode(), ENCODER.encode(h)))
        self.out.send("review", records)

    def reject(self, decisions: Sequence[ReviewDecision]) -> None:
        """As `sinks.courier.Parking` parks what a destination refused for good, so the
        exceptions tooling reads both alike (destination `review`)."""
        records: list[tuple[str, bytes | None, bytes]] = [
            (
                self.exceptions,
                b"review",
                parked("review", d.audit_id, [d.item], [d.review_id], {d.review_id: f"rejected in review by {d.by}: {d.why}"}, at=d.at),
            )
            for d in decisions
        ]
        self.out.send("rejected", records)

    def close(self) -> None:
        self.out.producer.flush()
