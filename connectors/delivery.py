"""Bytewax steps of the delivery dataflows: a sink that hands batches to couriers, one that
routes each batch to the courier of its kind (the ERP's lines and credit records), and the
stateful micro-batcher in front of the ERP.

A sink blocks while its destination is down or throttling; the worker then stops pulling,
so the backlog waits in Kafka as consumer lag and memory stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Message
from prometheus_client import Gauge

from operators.delivery import MicroBatcher
from runtime.metrics import BATCH_SIZE, PENDING_LINES
from sinks.courier import Courier

T = TypeVar("T")


class _CourierPartition(StatelessSinkPartition[Any], Generic[T]):
    """Decodes each item into a batch and gives it to every courier at once (each has its
    own rate limit and order; none waits for another). Items sent one per request (alerts)
    go to each courier in one call, so its window of requests in flight spans all the items
    Bytewax handed over, not one Kafka batch at a time; ERP batches stay as they were formed."""

    def __init__(self, couriers: list[Courier[T]], decode: Callable[[Any], list[T]], label: str) -> None:
        self.couriers, self.decode = couriers, decode
        # The first courier works in the worker's own thread, the others beside it.
        self.pool = ThreadPoolExecutor(len(couriers) - 1, thread_name_prefix=f"{label}-delivery") if len(couriers) > 1 else None
        self.batch = BATCH_SIZE.labels(label, "deliver")
        self.merge = not any(c.batched for c in couriers)

    def write_batch(self, items: list[Any]) -> None:
        batches = [self.decode(item) for item in items]
        for b in batches:
            self.batch.observe(len(b))
        if self.merge and len(batches) > 1:
            batches = [[x for b in batches for x in b]]
        for batch in batches:
            if self.pool is None:
                self.couriers[0].deliver(batch)
            else:
                others = [self.pool.submit(c.deliver, batch) for c in self.couriers[1:]]
                try:
                    self.couriers[0].deliver(batch)
                finally:
                    for f in others:
                        f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        for c in self.couriers:
            c.close()


class CourierSink(DynamicSink[Any], Generic[T]):
    """`make` builds the couriers in the worker (clients, threads and sockets are per process)."""

    def __init__(self, make: Callable[[], list[Courier[T]]], decode: Callable[[Any], list[T]], label: str) -> None:
        self.make, self.decode, self.label = make, decode, label

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CourierPartition[T]:
        return _CourierPartition(self.make(), self.decode, self.label)


class Deliverer(Protocol):
    """What a route hands its batches to: a courier, or the review desk's steps."""

    def deliver(self, items: Sequence[Any]) -> None: ...

    def close(self) -> None: ...


Route = tuple[Deliverer, Callable[[Any], list[Any]]]  # a kind's courier (or desk), and how its batch decodes


class _RoutedPartition(StatelessSinkPartition[tuple[str, Any]]):
    """Each keyed batch to the courier of its key, one after the other in the worker's own
    thread: the kinds share one remote, so one request at a time keeps its rate limit (see
    `share_remote`) and an outage holds them all back alike."""

    def __init__(self, routes: dict[str, Route], label: str) -> None:
        self.routes = routes
        self.batch = BATCH_SIZE.labels(label, "deliver")

    def write_batch(self, items: list[tuple[str, Any]]) -> None:
        for key, value in items:
            courier, decode = self.routes[key]
            batch = decode(value)
            self.batch.observe(len(batch))
            courier.deliver(batch)

    def close(self) -> None:
        for courier, _ in self.routes.values():
            courier.close()


class RoutedCourierSink(DynamicSink[tuple[str, Any]]):
    """`make` builds the routes in the worker: key -> (courier, decode)."""

    def __init__(self, make: Callable[[], dict[str, Route]], label: str) -> None:
        self.make, self.label = make, label

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RoutedPartition:
        return _RoutedPartition(self.make(), self.label)


def share_remote(lead: Courier[Any], follower: Courier[Any]) -> None:
    """`follower` posts to the same remote as `lead` (the ERP's credit records beside its
    lines): one token bucket, so together they stay within the remote's rate limit, and one
    circuit breaker, so an outage one of them sees holds the other too. Only for batched
    couriers used from one thread (`_RoutedPartition`), as the lock goes with them."""
    assert lead.batched and follower.batched, "only batched couriers send one request at a time"
    follower.lock, follower.settled = lead.lock, lead.settled
    follower.bucket, follower.breaker = lead.bucket, lead.breaker


def message_values(msgs: list[Message]) -> list[bytes]:
    return [m.value() or b"" for m in msgs]


# Pending lines and when the first arrived: the batch being formed survives a restart.
BatchState = tuple[list[bytes], float | None]


class Batcher(StatefulBatchLogic[bytes, list[bytes], BatchState]):
    """Closes a batch at `max_items` or when its first item is `max_latency` old; `pending`
    shows how many wait (the ERP's rated lines; None for a kind with no gauge of its own)."""

    def __init__(self, max_items: int, max_latency: float, resume: BatchState | None, pending: Gauge | None = PENDING_LINES) -> None:
        self.mb: MicroBatcher[bytes] = MicroBatcher(max_items, max_latency)
        self.pending = pending
        if resume is not None:
            self.mb.items, self.mb.first_at = list(resume[0]), resume[1]

    def _show(self) -> None:
        if self.pending is not None:
            self.pending.set(len(self.mb.items))

    def on_batch(self, values: list[bytes]) -> tuple[list[list[bytes]], bool]:
        now = time.time()
        out = [b for b in (self.mb.add(v, now) for v in values) if b]
        self._show()
        return out, self.RETAIN

    def on_notify(self) -> tuple[list[list[bytes]], bool]:
        b = self.mb.due(time.time())
        self._show()
        return ([b] if b else []), self.RETAIN

    def on_eof(self) -> tuple[list[list[bytes]], bool]:
        b = self.mb.take()
        self._show()
        return ([b] if b else []), self.RETAIN

    def notify_at(self) -> datetime | None:
        d = self.mb.deadline()
        return datetime.fromtimestamp(d, UTC) if d is not None else None

    def snapshot(self) -> BatchState:
        return (list(self.mb.items), self.mb.first_at)
