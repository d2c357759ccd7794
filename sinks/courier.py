"""What every destination shares: the courier that delivers to one of them.

`deliver(items)` returns only when each item was accepted or rejected for good; while the
destination is down or throttling it keeps waiting (token bucket, exponential back-off with
full jitter, Retry-After up to a cap, a circuit breaker that lets one probe through), which
is what holds the dataflow back: the backlog waits in Kafka, memory stays bounded.

Effectively once: the Redis ledger records each acknowledged id per destination and is
asked first, so redelivery after a restart or a replay skips what the destination has. A
batch is written ahead (its items under its idempotency key) before it is sent; a process
that dies before the answer leaves it pending, and the next one re-sends the *same* items
under the *same* key, which the destination recognises. What a destination rejects for
good is parked in the exceptions topic with the items and why, and delivery goes on.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec
from confluent_kafka import Producer

from operators.delivery import Backoff, CircuitBreaker, TokenBucket
from operators.periods import iso
from runtime.metrics import DELIVERED, LEDGER_UP, REQUEST_SECONDS, REQUESTS, RETRIES, circuit_state
from runtime.redis import Patience
from runtime.settings import DeliverySettings
from schemas.outputs import ENCODER
from sinks.base import Answer, Destination
from state.ledger import PENDING, Ledger

log = logging.getLogger(__name__)
T = TypeVar("T")
_LEDGER_DOWN: set[str] = set()  # destinations whose courier waits for Redis (for /readyz)


def ledger_problem() -> str | None:
    return f"Redis ledger unreachable ({', '.join(sorted(_LEDGER_DOWN))}); delivery held" if _LEDGER_DOWN else None


def batch_key(ids: Sequence[str]) -> str:
    """The idempotency key of a batch: the same ids always make the same key."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:32]


class Parking:
    """Items a destination rejected for good, kept with why for a person (and a re-drive)."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer, self.topic = producer, topic

    def park(self, destination: str, key: str, items: Sequence[Any], ids: list[str], answer: Answer, reasons: dict[str, str]) -> None:
        rec = {
            "destination": destination,
            "key": key,
            "ids": ids,
            "status": answer.status,
            "reasons": reasons,
            "response": answer.detail[:2000],
            "items": list(items),
            "at": iso(int(time.time() * 1000)),
        }
        self.producer.produce(self.topic, ENCODER.encode(rec), destination.encode())
        self.producer.flush()
        log.error("%s rejected %d item(s) with %s; parked in %s", destination, len(ids), answer.status, self.topic)


class Courier(Generic[T]):
    """Delivers to one destination. `batched`: items go as one batch per call, written ahead
    in the ledger; otherwise each item alone (alerts), under its own id as the key."""

    def __init__(
        self,
        dest: Destination[T],
        item_type: type[T],
        ident: Callable[[T], str],
        *,
        rate_per_second: float,
        policy: DeliverySettings,
        ledger: Ledger,
        parking: Parking,
        batched: bool,
        logged: tuple[str, str] = ("delivered", "rejected"),
        describe: Callable[[str, Sequence[T]], dict[str, Any]] | None = None,
        on_accepted: Callable[[T], None] | None = None,
        select: Callable[[T], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`select`: the items this destination takes (the others are not its to deliver)."""
        self.dest, self.name = dest, dest.name
        self.ident, self.batched = ident, batched
        self.ledger, self.parking = ledger, parking
        self.bucket = TokenBucket(rate_per_second, burst=1)
        self.backoff = Backoff(policy.retry_base_seconds, policy.retry_cap_seconds)
        self.breaker = CircuitBreaker(policy.breaker_threshold, policy.breaker_reset_seconds)
        self.cap = policy.retry_after_cap_seconds
        self.redis = Patience(f"{self.name} delivery ledger", Backoff(policy.retry_base_seconds, policy.retry_cap_seconds), self._ledger_up)
        self.encode_items = ENCODER.encode
        self.decode_items = msgspec.json.Decoder(list[item_type]).decode  # type: ignore[valid-type]
        self.logged, self.describe, self.on_accepted, self.select = logged, describe, on_accepted, select
        self.sleep = sleep
        self.seconds = REQUEST_SECONDS.labels(self.name)
        self.requests = {v: REQUESTS.labels(self.name, v) for v in ("ok", "retry", "reject")}
        self.retried = RETRIES.labels(self.name)
        circuit_state(self.name, self.breaker.state)

    def _ledger_up(self, up: bool) -> None:
        (_LEDGER_DOWN.discard if up else _LEDGER_DOWN.add)(self.name)
        LEDGER_UP.set(0 if _LEDGER_DOWN else 1)

    # -- one call per batch the dataflow hands over -------------------------------------
    def deliver(self, items: Sequence[T]) -> None:
        if self.select is not None:
            items = [x for x in items if self.select(x)]
        ids = [self.ident(x) for x in items]
        statuses = self.redis(lambda: self.ledger.status(self.name, ids))
        done = sum(1 for st in statuses if st is not None and not st.startswith(PENDING))
        DELIVERED.labels(self.name, "skipped").inc(done)
        if self.batched:
            self._batched(items, ids, statuses)
            return
        for x, i, st in zip(items, ids, statuses, strict=True):
            if st is None or st.startswith(PENDING):
                outcome = "rejected" if self._send(i, [x]) else "ok"
                # Recorded at once (one Redis round trip, small beside the request): a stop
                # leaves at most the alert in flight in doubt, which goes again under the
                # same key and the destination recognises; never the rest of the batch.
                self.redis(lambda i=i, o=outcome: self.ledger.ack(self.name, [i], o))  # type: ignore[misc]

    def _batched(self, items: Sequence[T], ids: list[str], statuses: list[str | None]) -> None:
        lost: set[str] = set()  # keys whose written-ahead items expired: their items go afresh
        for key in dict.fromkeys(st[len(PENDING) :] for st in statuses if st and st.startswith(PENDING)):
            body = self.redis(lambda k=key: self.ledger.intent(self.name, k))  # type: ignore[misc]
            if body is None:
                lost.add(PENDING + key)
            else:  # a batch a previous process sent without seeing the answer: the same again
                self._batch(key, self.decode_items(body))
        fresh = [x for x, st in zip(items, statuses, strict=True) if st is None or st in lost]
        if fresh:
            fresh_ids = [self.ident(x) for x in fresh]
            key = batch_key(fresh_ids)
            body = self.encode_items(fresh)
            self.redis(lambda: self.ledger.intend(self.name, key, fresh_ids, body))
            self._batch(key, fresh)

    def _batch(self, key: str, items: Sequence[T]) -> None:
        rejected = self._send(key, items)
        ids = [self.ident(x) for x in items]
        bad = [ids[i] for i in sorted(rejected)]
        good = [i for k, i in enumerate(ids) if k not in rejected]
        self.redis(lambda: self.ledger.ack(self.name, good, "ok"))
        self.redis(lambda: self.ledger.ack(self.name, bad, "rejected"))

    # -- attempts -------------------------------------------------------------------------
    def _send(self, key: str, items: Sequence[T]) -> set[int]:
        """Until the destination decides; returns the positions it rejected (parked)."""
        t0 = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            answer = self._attempt(key, items)
            if not answer.retry:
                break
            self.breaker.failure()
            circuit_state(self.name, self.breaker.state)
            self.retried.inc()
            delay = max(min(answer.retry_after or 0.0, self.cap), self.backoff.delay(attempt))
            log.warning(
                "%s: %s on attempt %d (circuit %s), retrying in %.2fs", self.name, answer.status, attempt, self.breaker.state, delay
            )
            self.sleep(delay)
        self.breaker.success()  # a reject means the remote is up; the request is what is wrong
        circuit_state(self.name, self.breaker.state)
        rejected = set(answer.rejected)
        self._account(key, items, answer, rejected, attempt, time.perf_counter() - t0)
        return rejected

    def _attempt(self, key: str, items: Sequence[T]) -> Answer:
        wait_open = self.breaker.wait()
        if wait_open:
            self.sleep(wait_open)
            circuit_state(self.name, self.breaker.state)  # half-open: this request is the probe
        self.sleep(self.bucket.reserve())
        t0 = time.perf_counter()
        try:
            answer = self.dest.send(key, items)
        except Exception as e:  # an adapter bug or an unexpected reply: not decided, try again
            log.exception("%s: sending %s failed", self.name, key)
            answer = Answer.later(type(e).__name__, str(e)[:500])
        self.seconds.observe(time.perf_counter() - t0)
        self.requests["retry" if answer.retry else "reject" if answer.rejected else "ok"].inc()
        return answer

    def _account(self, key: str, items: Sequence[T], answer: Answer, rejected: set[int], attempts: int, took: float) -> None:
        ids = [self.ident(x) for x in items]
        if rejected:
            bad = [ids[i] for i in sorted(rejected)]
            reasons = {ids[i]: answer.rejected[i] for i in sorted(rejected)}
            self.parking.park(self.name, key, [items[i] for i in sorted(rejected)], bad, answer, reasons)
            DELIVERED.labels(self.name, "rejected").inc(len(bad))
        accepted = [x for k, x in enumerate(items) if k not in rejected]
        DELIVERED.labels(self.name, "ok").inc(len(accepted))
        if self.on_accepted is not None:
            for x in accepted:
                self.on_accepted(x)
        fields = self.describe(key, items) if self.describe else {"key": key, "ids": ids}
        msg = self.logged[0] if not rejected else self.logged[1]
        took_ms = round(took * 1000, 1)
        log.info(msg, extra={**fields, "destination": self.name, "status": answer.status, "attempts": attempts, "ms": took_ms})

    def close(self) -> None:
        self.dest.close()
