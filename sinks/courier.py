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

Alerts go one per request, several at once per destination when the remote makes each wait
(its round trip would otherwise cap the rate far below the limit, and a burst of alerts would
queue behind it): as many as its waiting time and the limit call for, at most
`alert_max_in_flight` (`Courier._width`). Each request still takes its slot from the token
bucket, honours a Retry-After any of them received, and lets one probe through a half-open
circuit. Answers are recorded per group (one Redis round trip for all that arrived
meanwhile), and a request starts only while fewer than the window are unrecorded, so a stop
leaves at most the window in doubt, each re-sent under its own key. Alerts of one tenant go
in order, one at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
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
SERIAL_BELOW_S = 0.005  # a remote answering within this gets one alert request at a time (`Courier._width`)
_LEDGER_DOWN: set[str] = set()  # destinations whose courier waits for Redis (for /readyz)


def ledger_problem() -> str | None:
    return f"Redis ledger unreachable ({', '.join(sorted(_LEDGER_DOWN))}); delivery held" if _LEDGER_DOWN else None


def batch_key(ids: Sequence[str]) -> str:
    """The idempotency key of a batch: the same ids always make the same key."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:32]


def parked(
    destination: str,
    key: str,
    items: Sequence[Any],
    ids: list[str],
    reasons: dict[str, str],
    *,
    status: int | str | None = 0,
    response: str = "",
    at: str | None = None,
) -> bytes:
    """A record of the exceptions topic (read by `ops.exceptions.Parked`): items kept for a
    person, with why per id. Written here, by review, and by the invoice-status paths."""
    rec = {
        "destination": destination,
        "key": key,
        "ids": ids,
        "status": status,
        "reasons": reasons,
        "response": response[:2000],
        "items": list(items),
        "at": at or iso(int(time.time() * 1000)),
    }
    return ENCODER.encode(rec)


class Parking:
    """Items a destination rejected for good, kept with why for a person (and a re-drive)."""

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer, self.topic = producer, topic

    def park(self, destination: str, key: str, items: Sequence[Any], ids: list[str], answer: Answer, reasons: dict[str, str]) -> None:
        rec = parked(destination, key, items, ids, reasons, status=answer.status, response=answer.detail)
        self.producer.produce(self.topic, rec, destination.encode())
        self.producer.flush()
        log.error("%s rejected %d item(s) with %s; parked in %s", destination, len(ids), answer.status, self.topic)


class _Group:
    """The answers of one batch of alerts sent at once: those not yet recorded, how many
    are still to be decided, and the first failure (which stops the batch)."""

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.pending: list[tuple[str, str]] = []
        self.writing = False
        self.left = n
        self.failure: BaseException | None = None
        self.done = threading.Event()
        if n == 0:
            self.done.set()

    def decided(self, n: int) -> None:
        with self.lock:
            self.left -= n
            if self.left <= 0:
                self.done.set()

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = e
        self.done.set()


class Courier(Generic[T]):
    """Delivers to one destination. `batched`: items go as one batch per call, written ahead
    in the ledger; otherwise each item alone (alerts), under its own id as the key, up to
    `policy.alert_max_in_flight` at once (or the destination's own `max_in_flight`)."""

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
        order: Callable[[T], str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`select`: the items this destination takes (the others are not its to deliver);
        `order`: items with the same value go one after the other, in order (a tenant's alerts)."""
        self.dest, self.name = dest, dest.name
        self.ident, self.batched = ident, batched
        self.ledger, self.parking = ledger, parking
        self.clock = clock
        self.bucket = TokenBucket(rate_per_second, burst=1, clock=clock)
        self.backoff = Backoff(policy.retry_base_seconds, policy.retry_cap_seconds)
        self.breaker = CircuitBreaker(policy.breaker_threshold, policy.breaker_reset_seconds, clock=clock)
        self.cap = policy.retry_after_cap_seconds
        self.redis = Patience(f"{self.name} delivery ledger", Backoff(policy.retry_base_seconds, policy.retry_cap_seconds), self._ledger_up)
        self.encode_items = ENCODER.encode
        self.decode_items = msgspec.json.Decoder(list[item_type]).decode  # type: ignore[valid-type]
        self.logged, self.describe, self.on_accepted, self.select = logged, describe, on_accepted, select
        self.order = order
        self.sleep = sleep
        self.seconds = REQUEST_SECONDS.labels(self.name)
        self.requests = {v: REQUESTS.labels(self.name, v) for v in ("ok", "retry", "reject")}
        self.retried = RETRIES.labels(self.name)
        # What requests in flight share: the bucket, the breaker and its one probe, and the
        # earliest time a Retry-After allows the next request (`gate` counts the events that
        # make a request admitted before them look again: a new Retry-After, an opened circuit).
        own: int | None = getattr(dest, "max_in_flight", None)  # a destination that takes fewer at once says so
        self.window = 1 if batched else max(1, policy.alert_max_in_flight if own is None else min(own, policy.alert_max_in_flight))
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)
        self.probing = False
        self.hold_until = -math.inf
        self.gate = 0
        self.wait_s: float | None = None  # how long the remote makes a request wait, learnt from its answers
        self.pool = ThreadPoolExecutor(self.window, thread_name_prefix=f"{self.name}-send") if self.window > 1 else None
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
        todo = [(x, i) for x, i, st in zip(items, ids, statuses, strict=True) if st is None or st.startswith(PENDING)]
        lanes: dict[str, list[tuple[T, str]]] = {}
        for x, i in todo:
            lanes.setdefault(self.order(x) if self.order is not None else i, []).append((x, i))
        width = self._width()
        if self.pool is not None and width > 1 and len(lanes) > 1:
            self._windowed(list(lanes.values()), width, self.pool)
            return
        for x, i in todo:  # one at a time (one lane: one tenant's alerts, in order anyway)
            outcome = "rejected" if self._send(i, [x]) else "ok"
            # Recorded at once (one Redis round trip, small beside the request): a stop
            # leaves at most the alert in flight in doubt, which goes again under the
            # same key and the destination recognises; never the rest of the batch.
            self.redis(lambda i=i, o=outcome: self.ledger.ack(self.name, [i], o))  # type: ignore[misc]

    def _windowed(self, lanes: list[list[tuple[T, str]]], width: int, pool: ThreadPoolExecutor) -> None:
        """Lanes at once, each in order, up to `width` items unrecorded at once.

        A request takes a slot before it starts and gives it back once its answer is in the
        ledger: a stop at any moment leaves at most `width` items in doubt (sent, or answered
        and not yet recorded), each re-sent under its own key by the next process. Answers
        are recorded by group commit: the lane thread that finds no write under way writes
        every answer that arrived meanwhile in one round trip; the others go on sending."""
        slots = threading.Semaphore(width)
        g = _Group(sum(len(seq) for seq in lanes))

        def record() -> None:
            with g.lock:
                if g.writing:
                    return  # the writer takes this answer with its next group
                g.writing = True
            while True:
                with g.lock:
                    group, g.pending = g.pending, []
                    if not group:
                        g.writing = False
                        return
                try:
                    self._record(group)
                except BaseException as e:
                    g.fail(e)
                    raise
                finally:
                    slots.release(len(group))
                g.decided(len(group))

        def lane(seq: list[tuple[T, str]]) -> None:
            for x, i in seq:
                slots.acquire()
                if g.failure is not None:  # the slot goes on to the next lane that stops
                    slots.release()
                    return
                try:
                    outcome = "rejected" if self._send(i, [x]) else "ok"
                except BaseException as e:  # handed to the caller's thread, raised there
                    g.fail(e)
                    return
                with g.lock:
                    g.pending.append((i, outcome))
                try:
                    record()
                except BaseException:
                    return

        futures = [pool.submit(lane, seq) for seq in lanes]
        g.done.wait()
        if g.failure is None:
            return
        slots.release(width)  # a lane failed or recording did: start nothing more, record what was answered
        wait_all(futures)
        self._record(g.pending)
        raise g.failure

    def _record(self, answered: list[tuple[str, str]]) -> int:
        """One group of answers into the ledger (one round trip per outcome present)."""
        for outcome in ("ok", "rejected"):
            ids = [i for i, o in answered if o == outcome]
            if ids:
                self.redis(lambda ids=ids, o=outcome: self.ledger.ack(self.name, ids, o))  # type: ignore[misc]
        return len(answered)

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

    def _width(self) -> int:
        """Requests to keep in flight: as many as the remote's waiting time and the rate
        limit call for (Little's law: waiting time x rate, half again for jitter), at most
        the window. Waiting is an answer's time less this thread's own CPU: threads overlap
        waiting, not Python's work (one GIL). Under `SERIAL_BELOW_S` — a loopback sandbox,
        a remote next door — requests go one at a time: what looks like waiting there is
        mostly waiting for the GIL, which more threads only lengthen (measured: 45 % more
        CPU per alert and p99 150 ms instead of 90 ms at 1,000 requests/s, for nothing)."""
        if self.wait_s is None:  # nothing answered yet: as if the remote were slow
            return self.window
        if self.wait_s < SERIAL_BELOW_S:
            return 1
        return max(1, min(self.window, math.ceil(self.wait_s * self.bucket.rate * 1.5)))

    # -- attempts -------------------------------------------------------------------------
    def _send(self, key: str, items: Sequence[T]) -> set[int]:
        """Until the destination decides; returns the positions it rejected (parked)."""
        t0 = time.perf_counter()
        attempt = 0
        waited_until = -math.inf
        while True:
            attempt += 1
            answer = self._attempt(key, items, waited_until)
            if not answer.retry:
                break
            self.retried.inc()
            delay = max(min(answer.retry_after or 0.0, self.cap), self.backoff.delay(attempt))
            log.warning(
                "%s: %s on attempt %d (circuit %s), retrying in %.2fs", self.name, answer.status, attempt, self.breaker.state, delay
            )
            waited_until = max(waited_until, self.clock() + delay)  # this request's own wait covers its Retry-After
            self.sleep(delay)
        rejected = set(answer.rejected)
        self._account(key, items, answer, rejected, attempt, time.perf_counter() - t0)
        return rejected

    def _attempt(self, key: str, items: Sequence[T], waited_until: float) -> Answer:
        probe = self._admit(waited_until)
        answer: Answer | None = None
        try:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                answer = self.dest.send(key, items)
            except Exception as e:  # an adapter bug or an unexpected reply: not decided, try again
                log.exception("%s: sending %s failed", self.name, key)
                answer = Answer.later(type(e).__name__, str(e)[:500])
            took = time.perf_counter() - t0
            waited = max(0.0, took - (time.thread_time() - cpu0))
            # a moving average over the last requests, from the first answer on
            self.wait_s = waited if self.wait_s is None else self.wait_s + (waited - self.wait_s) / 8
            self.seconds.observe(took)
            self.requests["retry" if answer.retry else "reject" if answer.rejected else "ok"].inc()
            return answer
        finally:
            self._settle(probe, answer)

    def _admit(self, waited_until: float) -> bool:
        """Wait until a request may start: while a probe is out, for its answer; then for
        the open circuit, for a Retry-After (unless this request's own wait already covered
        it), then for a slot of the token bucket. A Retry-After or an opened circuit that
        arrives during those waits sends it round again. Returns whether it is the probe."""
        while True:
            with self.lock:
                while self.probing:
                    self.settled.wait()
                seen = self.gate
                hold = self.hold_until - self.clock() if self.hold_until > waited_until else 0.0
                circuit = self.breaker.wait()
                probe = self.breaker.opened_at is not None  # open or half-open: this one is the probe
                self.probing = probe
            try:
                if max(hold, circuit) > 0:
                    self.sleep(max(hold, circuit))
                if probe:
                    circuit_state(self.name, self.breaker.state)  # half-open: this request is the probe
                with self.lock:
                    slot = self.bucket.reserve()
                if slot > 0:
                    self.sleep(slot)
            except BaseException:
                self._settle(probe, None)  # the waiting requests must not wait for a probe that never goes
                raise
            with self.lock:
                if probe or self.gate == seen:
                    return probe

    def _settle(self, probe: bool, answer: Answer | None) -> None:
        """The breaker and the Retry-After every request shares learn this answer (None: the
        attempt never finished); a probe's answer lets the requests waiting for it go."""
        with self.lock:
            if answer is not None and answer.retry:
                was_closed = self.breaker.opened_at is None
                self.breaker.failure()
                if was_closed and self.breaker.opened_at is not None:
                    self.gate += 1
                if answer.retry_after is not None:
                    until = self.clock() + min(answer.retry_after, self.cap)
                    if until > self.hold_until:
                        self.hold_until = until
                        self.gate += 1
            elif answer is not None:
                self.breaker.success()  # a reject means the remote is up; the request is what is wrong
            if probe:
                self.probing = False
                self.settled.notify_all()
        circuit_state(self.name, self.breaker.state)

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
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.dest.close()
