"""The courier every destination shares, with a scripted destination (the protocol is ours)
and the real Redis ledger and Kafka exceptions topic: retries, Retry-After with its cap,
the breaker, skipping what was acknowledged, re-sending a written-ahead batch as it was,
and parking what is rejected for good; and alerts sent with requests in flight at once,
under the same rate limit, Retry-After, breaker and ledger guarantees."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from itertools import pairwise

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
    not every alert of the batch that was already accepted. (A window of one: what a
    destination that takes one request at a time gets, e.g. Tryton.)"""
    batch = [line(i) for i in range(5)]
    with pytest.raises(Stopped):
        courier(settings, StopsAt(3), [], batched=False, alert_max_in_flight=1).deliver(batch)
    statuses = Ledger(settings.stores).status("erp", [x.line_id for x in batch])
    assert statuses == ["ok", "ok", "ok", None, None]
    again = Scripted()
    courier(settings, again, [], batched=False, alert_max_in_flight=1).deliver(batch)
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


# -- alerts with requests in flight at once (real threads, real time, the real ledger) ----


class Remote:
    """A destination answering each request after `latency` seconds, from several threads at
    once, as a remote does: it records when each request started and ended, how many were
    in flight, and answers from `script` (id -> answers in turn) or else accepts."""

    name = "erp"

    def __init__(self, latency: float = 0.02, script: dict[str, list[Answer]] | None = None) -> None:
        self.latency = latency
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.lock = threading.Lock()
        self.inflight = self.peak = 0
        self.log: list[tuple[float, float, str, str, bool]] = []  # (start, end, key, id, accepted)
        self.before: list[tuple[str, float]] = []  # (key, start) of every request, in start order

    def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
        (x,) = items
        with self.lock:
            t0 = time.monotonic()
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            self.before.append((key, t0))
            nth = len(self.before)
            answers = self.script.get(x.line_id)
            answer = answers.pop(0) if answers else Answer()
        self.on_start(nth)
        time.sleep(self.latency)
        with self.lock:
            self.inflight -= 1
            self.log.append((t0, time.monotonic(), key, x.line_id, not answer.retry))
        return answer

    def on_start(self, nth: int) -> None:
        pass

    def close(self) -> None:
        pass


def alert_courier(s: Settings, dest: Remote, *, window: int, rate: float = 1000, **policy: float) -> Courier[RatedUsageLine]:
    return Courier(
        dest,
        RatedUsageLine,
        lambda ln: ln.line_id,
        rate_per_second=rate,
        policy=DeliverySettings(retry_base_seconds=0.01, retry_cap_seconds=0.02, alert_max_in_flight=window, **policy),  # type: ignore[arg-type]
        ledger=Ledger(s.stores),
        parking=Parking(kafka.producer(s.kafka.config()), s.topics.dlq),
        batched=False,
        order=lambda ln: ln.tenant_id,
    )


def lines_of(n: int, tenants: int | None = None) -> list[RatedUsageLine]:
    return [msgspec_replace(line(i), tenant_id=f"t-{i % (tenants or n):04d}") for i in range(n)]


def msgspec_replace(ln: RatedUsageLine, **changes: str) -> RatedUsageLine:
    import msgspec

    return msgspec.structs.replace(ln, **changes)


class StopsMidWindow(Remote):
    """Stops the process at its `n`-th request (a SIGTERM exits at once): what the ledger says
    at that moment is what the next process finds."""

    def __init__(self, s: Settings, ids: list[str], n: int) -> None:
        super().__init__(latency=0.03)
        self.ledger, self.ids, self.n = Ledger(s.stores), ids, n
        self.doubt: list[int] = []  # at each request's start: requests started and not recorded
        self.at_stop: list[str | None] = []

    def on_start(self, nth: int) -> None:
        recorded = sum(1 for st in self.ledger.status("erp", self.ids) if st == "ok")
        self.doubt.append(nth - recorded)
        if nth == self.n:
            self.at_stop = self.ledger.status("erp", self.ids)
            raise Stopped


def test_alerts_go_concurrently_and_a_stop_leaves_at_most_the_window_in_doubt(settings: Settings):
    """Up to the window in flight at once, answers recorded in groups, and never more than
    the window started and unrecorded: a stop leaves at most the window to go again, each
    under its own key, and nothing that was recorded goes twice."""
    batch = lines_of(40)
    ids = [x.line_id for x in batch]
    dest = StopsMidWindow(settings, ids, n=25)
    with pytest.raises(Stopped):
        alert_courier(settings, dest, window=4).deliver(batch)
    assert dest.peak == 4, f"{dest.peak} requests in flight at most: alerts did not go concurrently"
    assert max(dest.doubt) <= 4, f"{max(dest.doubt)} requests started and unrecorded at once (window 4)"
    recorded = {i for i, st in zip(ids, dest.at_stop, strict=True) if st == "ok"}
    started = {k for k, _ in dest.before}
    assert len(started - recorded) <= 4 and len(recorded) >= 25 - 4
    # The next process, from what the ledger held at the stop: only the rest goes.
    Ledger(settings.stores).forget("erp", [i for i in ids if i not in recorded])
    again = Remote(latency=0.001)
    alert_courier(settings, again, window=4).deliver(batch)
    assert sorted(k for k, _ in again.before) == sorted(set(ids) - recorded)
    assert all(key == i for _, _, key, i, _ in again.log)  # each under its own id: the remote recognises a repeat


def test_concurrent_alerts_keep_to_the_rate_limit_and_one_429_holds_them_all(settings: Settings):
    """With 8 requests in flight at once: request starts never exceed rate + 1 in any second;
    after a 429 with Retry-After reaches the courier, no request starts before it elapses;
    the throttled alert goes again under its key and every alert is delivered exactly once."""
    n, rate = 100, 40.0
    batch = lines_of(n)
    throttled = batch[6].line_id
    dest = Remote(latency=0.05, script={throttled: [Answer.later(429, retry_after=0.4)]})
    t0 = time.monotonic()
    alert_courier(settings, dest, window=8, rate=rate).deliver(batch)
    took = time.monotonic() - t0
    assert dest.peak > 1, "alerts did not go concurrently"
    starts = sorted(t for _, t in dest.before)
    for k, t in enumerate(starts):
        in_one_second = sum(1 for u in starts[k:] if u - t < 1.0)
        assert in_one_second <= rate + 1, f"{in_one_second} requests started within 1 s (limit {rate:g}/s)"
    (answered_429,) = [end for _, end, _, i, ok in dest.log if not ok]
    # (a request that passed the gate while the 429 was on its way back may start just after it)
    late = [round(t - answered_429, 3) for t in starts if answered_429 + 0.005 <= t < answered_429 + 0.4 - 0.01]
    assert not late, f"requests started {late} s after a 429 with Retry-After 0.4"
    accepted = [i for *_, i, ok in dest.log if ok]
    assert sorted(accepted) == sorted(x.line_id for x in batch), "an alert was lost or delivered twice"
    assert [k for k, _ in dest.before].count(throttled) == 2
    assert Ledger(settings.stores).status("erp", [x.line_id for x in batch]) == ["ok"] * n
    assert took < n / rate + 0.4 + 1.0, f"{took:.1f}s: one request at a time takes {n * 0.05 + 0.4:.1f} s"


def test_a_half_open_circuit_lets_one_probe_through_while_the_others_wait(settings: Settings):
    """The remote fails every request for a while: the circuit opens, and from then on no
    two requests started while it was open are in flight together, however many alerts
    wait; when it answers again, everything is delivered once."""
    batch = lines_of(30)
    down_until = time.monotonic() + 0.6
    c: Courier[RatedUsageLine]

    class Flaky(Remote):
        def __init__(self) -> None:
            super().__init__(latency=0.02)
            self.open_inflight = self.open_peak = 0

        def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
            opened = c.breaker.opened_at is not None
            with self.lock:
                self.open_inflight += opened
                self.open_peak = max(self.open_peak, self.open_inflight)
            try:
                if time.monotonic() < down_until:
                    time.sleep(self.latency)
                    with self.lock:
                        self.log.append((0, 0, key, items[0].line_id, False))
                        self.before.append((key, 0))
                    return Answer.later(503)
                return super().send(key, items)
            finally:
                with self.lock:
                    self.open_inflight -= opened

    dest = Flaky()
    c = alert_courier(settings, dest, window=8, breaker_threshold=3, breaker_reset_seconds=0.15)
    c.deliver(batch)
    assert dest.peak > 1, "alerts did not go concurrently once the remote was back"
    assert dest.open_peak == 1, f"{dest.open_peak} requests went at once through an open or half-open circuit"
    failed = sum(1 for *_, ok in dest.log if not ok)
    assert failed <= 8 + 0.6 / 0.15 + 2, f"{failed} failed requests: the open circuit did not hold the others back"
    assert sorted(i for *_, i, ok in dest.log if ok) == sorted(x.line_id for x in batch)
    assert c.breaker.state == "closed"


def test_a_tenants_alerts_keep_their_order_while_tenants_go_concurrently(settings: Settings):
    """A tenant's alerts go one after the other, each after the previous one was answered
    (80 % reaches the CRM before 100 %), while other tenants' alerts go meanwhile."""
    batch = lines_of(48, tenants=6)
    dest = Remote(latency=0.01)
    alert_courier(settings, dest, window=8).deliver(batch)
    assert dest.peak > 1
    tenant = {x.line_id: x.tenant_id for x in batch}
    for t in sorted(set(tenant.values())):
        sent = sorted((start, end, i) for start, end, _, i, _ in dest.log if tenant[i] == t)
        assert [i for *_, i in sent] == [x.line_id for x in batch if x.tenant_id == t], f"{t}'s alerts were reordered"
        overlaps = [(a[2], b[2]) for a, b in pairwise(sent) if b[0] < a[1]]
        assert not overlaps, f"{t}'s alerts {overlaps[0]} were in flight together"


def test_a_remote_next_door_gets_one_request_at_a_time_a_distant_one_a_window(settings: Settings):
    """As many in flight as the remote's waiting time and the limit call for (Little's law):
    one answering in 50 ms at 200/s needs about fifteen, and gets the window (8); one that
    answers in 1 ms gets one at a time even at 1,000/s: on loopback, threads only add GIL
    hand-offs (more CPU per alert and a longer tail, measured in the alert dataflow)."""
    fast = Remote(latency=0.001)
    c = alert_courier(settings, fast, window=8, rate=1000)
    c.deliver(lines_of(30))  # learns the waiting time (it starts assuming a slow remote)
    fast.peak = 0
    c.deliver([msgspec_replace(x, line_id=f"m-{k}") for k, x in enumerate(lines_of(30))])
    assert fast.peak == 1, f"{fast.peak} requests in flight to a remote that answers in 1 ms"
    slow = Remote(latency=0.05)
    s = alert_courier(settings, slow, window=8, rate=200)
    s.deliver([msgspec_replace(x, line_id=f"s-{k}") for k, x in enumerate(lines_of(8))])
    slow.peak = 0
    s.deliver([msgspec_replace(x, line_id=f"n-{k}") for k, x in enumerate(lines_of(30))])
    assert slow.peak == 8


def test_two_couriers_to_one_remote_share_its_rate_limit(settings: Settings):
    """The ERP's lines and credit records go through couriers of their own (ledger
    namespaces `erp`, `erp-credits`) to one remote: `share_remote` gives them one token
    bucket, so alternating batches of both still keep to the remote's 2 requests/s."""
    from connectors.delivery import share_remote

    now = [0.0]
    sent_at: list[tuple[str, float]] = []

    class Timed(Scripted):
        def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
            sent_at.append((self.name, now[0]))
            return super().send(key, items)

    def sleep(d: float) -> None:
        now[0] += max(d, 0.0)

    def make(name: str) -> Courier[RatedUsageLine]:
        dest = Timed()
        dest.name = name
        return Courier(
            dest,
            RatedUsageLine,
            lambda ln: ln.line_id,
            rate_per_second=2,
            policy=DeliverySettings(),
            ledger=Ledger(settings.stores),
            parking=Parking(kafka.producer(settings.kafka.config()), settings.topics.dlq),
            batched=True,
            sleep=sleep,
            clock=lambda: now[0],
        )

    lines, records = make("erp"), make("erp-credits")
    share_remote(lines, records)
    assert records.bucket is lines.bucket and records.breaker is lines.breaker
    for i in range(4):
        lines.deliver([line(10 + i)])
        records.deliver([line(20 + i)])
    assert [n for n, _ in sent_at] == ["erp", "erp-credits"] * 4
    gaps = [b - a for (_, a), (_, b) in pairwise(sent_at)]
    assert min(gaps) >= 0.5 - 1e-9, f"requests {gaps} s apart: above 2/s together"
