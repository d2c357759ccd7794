"""The courier every destination shares, with a scripted destination (the protocol is ours)
and the real Redis ledger and Kafka exceptions topic: retries, Retry-After with its cap,
the breaker, skipping what was acknowledged, re-sending a written-ahead batch as it was,
and parking what is rejected for good."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import DeliverySettings, Settings
from schemas.outputs import ENCODER, RatedUsageLine
from sinks.base import Answer
from sinks.courier import Courier, Parking, batch_key
from state.ledger import Ledger
from tests.sinks.test_adapters import line


class Scripted:
    """A destination that answers from a script, and records what it was sent."""

    name = "erp"

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, list[str]]] = []

    def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
        self.sent.append((key, [x.line_id for x in items]))
        return self.answers.pop(0) if self.answers else Answer()

    def close(self) -> None:
        pass


def courier(s: Settings, dest: Scripted, slept: list[float], batched: bool = True, **policy: float) -> Courier[RatedUsageLine]:
    return Courier(
        dest,
        RatedUsageLine,
        lambda ln: ln.line_id,
        rate_per_second=1000,
        policy=DeliverySettings(retry_base_seconds=0.01, retry_cap_seconds=0.02, **policy),  # type: ignore[arg-type]
        ledger=Ledger(s.stores),
        parking=Parking(kafka.producer(s.kafka.config()), s.topics.dlq),
        batched=batched,
        sleep=slept.append,
    )


def test_retries_honour_retry_after_up_to_the_cap_then_deliver_once(settings: Settings):
    dest = Scripted(Answer.later(429, retry_after=7.0), Answer.later(429, retry_after=1e9), Answer.later(503))
    slept: list[float] = []
    c = courier(settings, dest, slept, retry_after_cap_seconds=60.0, breaker_threshold=10)
    batch = [line(1), line(2)]
    c.deliver(batch)
    assert len(dest.sent) == 4 and len({k for k, _ in dest.sent}) == 1  # one key for every attempt
    waits = [x for x in slept if x > 0.05]
    assert waits == [7.0, 60.0]
    c.deliver(batch)  # acknowledged: never sent again
    assert len(dest.sent) == 4


def test_a_written_ahead_batch_is_sent_again_as_it_was(settings: Settings):
    """A process died after writing a batch ahead and before the answer: the next one sends
    the same items under the same key, even when it is handed them differently."""
    first = [line(1), line(2), line(3)]
    ledger = Ledger(settings.stores)
    key = batch_key([x.line_id for x in first])
    ledger.intend("erp", key, [x.line_id for x in first], ENCODER.encode(first))
    dest = Scripted()
    courier(settings, dest, []).deliver([line(2), line(4)])
    assert dest.sent[0] == (key, ["l-1", "l-2", "l-3"])
    assert dest.sent[1][1] == ["l-4"] and len(dest.sent) == 2


class Stopped(BaseException):
    """The process stopping mid-batch (SIGTERM exits at once, between two requests)."""


class StopsAt(Scripted):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
        if len(self.sent) == self.n:
            raise Stopped
        return super().send(key, items)


def test_one_at_a_time_each_item_is_recorded_as_soon_as_it_is_accepted(settings: Settings):
    """Alerts go one by one: a stop mid-batch leaves only the alert in flight to go again,
    not every alert of the batch that was already accepted."""
    batch = [line(i) for i in range(5)]
    with pytest.raises(Stopped):
        courier(settings, StopsAt(3), [], batched=False).deliver(batch)
    statuses = Ledger(settings.stores).status("erp", [x.line_id for x in batch])
    assert statuses == ["ok", "ok", "ok", None, None]
    again = Scripted()
    courier(settings, again, [], batched=False).deliver(batch)
    assert again.sent == [("l-3", ["l-3"]), ("l-4", ["l-4"])]


def test_what_is_rejected_for_good_is_parked_with_why_and_the_rest_delivered(settings: Settings):
    dest = Scripted(Answer(rejected={1: "unknown customer ERP-1"}, status=200))
    courier(settings, dest, []).deliver([line(1), line(2), line(3)])
    (rec,) = [orjson.loads(v) for v in read_topic(settings.kafka.config(), settings.topics.dlq)]
    assert rec["ids"] == ["l-2"] and rec["reasons"] == {"l-2": "unknown customer ERP-1"}
    assert [x["line_id"] for x in rec["items"]] == ["l-2"]
    statuses = Ledger(settings.stores).status("erp", ["l-1", "l-2", "l-3"])
    assert statuses == ["ok", "rejected", "ok"]


def test_the_breaker_opens_after_consecutive_failures_and_probes_once(settings: Settings):
    dest = Scripted(*[Answer.later("timeout")] * 4)
    slept: list[float] = []
    c = courier(settings, dest, slept, breaker_threshold=2, breaker_reset_seconds=0.05)
    c.deliver([line(1)])
    assert len(dest.sent) == 5 and c.breaker.state == "closed"
    # Backoff waits are at most 0.02 s here; the open circuit made it wait for its reset.
    assert any(0.02 < x <= 0.05 for x in slept), slept
