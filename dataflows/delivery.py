"""Delivery dataflows, one per destination class, so a slow ERP holds back only ERP posting.

* alerts: usage.alerts -> CRM and customer-success tool, each alert as soon as it is read;
* erp: usage.rated -> micro-batches (size or max latency from the first line) -> ERP.

Sinks block while a destination is down or throttling; the worker then stops pulling, so
the backlog waits in Kafka as consumer lag and memory stays bounded. The Redis ledger
skips ids a destination already acknowledged; a request the destination rejects for good
(4xx) goes to the exceptions topic with the payload and the response.

Run: `tallyflow deliver alerts|erp`, or `python -m bytewax.run "dataflows.delivery:alerts_flow()"`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import bytewax.operators as op
import msgspec
import orjson
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Message
from prometheus_client import Gauge

from dataflows.kafka_io import KafkaBatchSource
from operators.delivery import Backoff, MicroBatcher
from operators.periods import iso
from schemas.outputs import ENCODER, RatedUsageLine, ThresholdAlert
from sinks.http import Destination, Result, batch_key, sign
from sinks.ledger import PENDING, Ledger
from sinks.patience import Patience
from tallyflow import kafka, runtime
from tallyflow.config import Settings, kafka_config, load_settings
from tallyflow.observability import BATCH_SIZE, DELIVERED, DELIVERY_LATENCY

log = logging.getLogger(__name__)
R = TypeVar("R")
ALERT = msgspec.json.Decoder(ThresholdAlert)
LINE = msgspec.json.Decoder(RatedUsageLine)
PENDING_LINES = Gauge("tallyflow_erp_pending_lines", "Rated lines held for the next ERP micro-batch.")
LEDGER_UP = Gauge("tallyflow_ledger_up", "0 while delivery waits for the Redis ledger.")
LEDGER_UP.set(1)
_LEDGER = {"up": True}  # for /readyz; the gauge is for dashboards


class _Delivery:
    """What both sinks share: the ledger (retried while Redis is away) and the exceptions topic."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.ledger = Ledger(s.redis_url, int(s.ledger_ttl_days * 86400), f"{s.redis_prefix}:ledger")
        self.exceptions = kafka.producer(kafka_config(s))
        # Never deliver without the ledger: wait (and say so) while Redis is unreachable.
        self.redis = Patience("delivery ledger", Backoff(s.retry_base_seconds, s.retry_cap_seconds), on_change=_ledger_up)

    def park(self, destination: str, ids: list[str], request: bytes, result: Result) -> None:
        """A request the destination will never accept: keep it, with why, for a person."""
        rec = {
            "destination": destination,
            "ids": ids,
            "status": result.status,
            "response": result.body[:2000],
            "request": orjson.loads(request),
            "at": iso(int(time.time() * 1000)),
        }
        self.exceptions.produce(self.s.exceptions_topic, orjson.dumps(rec), destination.encode())
        self.exceptions.flush()
        log.error("%s rejected %d id(s) with %s; parked in %s", destination, len(ids), result.status, self.s.exceptions_topic)


class _AlertPartition(StatelessSinkPartition[list[Message]], _Delivery):
    def __init__(self, s: Settings) -> None:
        _Delivery.__init__(self, s)
        self.dest = {
            "crm": Destination("crm", s.crm_url, s.crm_rate_per_second, s, token=s.crm_token),
            "success": Destination("success", s.success_url, s.success_rate_per_second, s),
        }
        self.key = s.success_hmac_key.encode()
        self.pool = ThreadPoolExecutor(len(self.dest), thread_name_prefix="alert-delivery")
        self.batch = BATCH_SIZE.labels("alerts", "deliver")

    def write_batch(self, items: list[list[Message]]) -> None:
        alerts = [ALERT.decode(m.value() or b"") for batch in items for m in batch]
        self.batch.observe(len(alerts))
        # Each destination has its own rate limit and order; neither waits for the other.
        for f in [self.pool.submit(self._deliver, name, alerts) for name in self.dest]:
            f.result()

    def _deliver(self, name: str, alerts: list[ThresholdAlert]) -> None:
        """One ledger read and one write per batch: an alert sent but not yet recorded is
        re-sent after a crash under the same Idempotency-Key, which the remote replays."""
        wanted = [a for a in alerts if name in a.destinations]
        todo = set(self.redis(lambda: self.ledger.unacked(name, [a.alert_id for a in wanted])))
        outcome: dict[str, list[str]] = {"ok": [], "rejected": []}
        DELIVERED.labels(name, "skipped").inc(len(wanted) - len(todo))
        for a in wanted:
            if a.alert_id not in todo:
                continue
            t0 = time.perf_counter()
            body = ENCODER.encode(a)
            if name == "crm":
                r = self.dest[name].send(f"/crm/accounts/{a.crm_account_id}/signals", body, {"Idempotency-Key": a.alert_id})
            else:
                # Webhook receivers dedupe on the event id (as in the Standard Webhooks spec).
                headers = {"X-Tallyflow-Signature": sign(self.key, body), "Idempotency-Key": a.alert_id}
                r = self.dest[name].send("/success/webhook", body, headers)
            if not r.ok:
                self.park(name, [a.alert_id], body, r)
            result = "ok" if r.ok else "rejected"
            outcome[result].append(a.alert_id)
            DELIVERED.labels(name, result).inc()
            if r.ok:
                DELIVERY_LATENCY.labels(name).observe(max(0.0, time.time() - _epoch(a.detected_at)))
            log.info(
                "alert delivered" if r.ok else "alert rejected",
                extra={
                    "alert_id": a.alert_id,
                    "correlation_id": a.correlation_id,
                    "tenant_id": a.tenant_id,
                    "destination": name,
                    "status": r.status,
                    "attempts": r.attempts,
                    "ms": round((time.perf_counter() - t0) * 1000, 1),
                },
            )
        for result, ids in outcome.items():
            self.redis(lambda r=result, i=ids: self.ledger.ack(name, i, r))  # type: ignore[misc]

    def close(self) -> None:
        self.pool.shutdown()
        for d in self.dest.values():
            d.close()


class _ErpPartition(StatelessSinkPartition[tuple[str, list[bytes]]], _Delivery):
    def __init__(self, s: Settings) -> None:
        _Delivery.__init__(self, s)
        self.erp = Destination("erp", s.erp_url, s.erp_rate_per_second, s, token=s.erp_token)
        self.batch = BATCH_SIZE.labels("erp", "post")

    def write_batch(self, items: list[tuple[str, list[bytes]]]) -> None:
        for _, raw in items:
            lines = [LINE.decode(b) for b in raw]
            statuses = self.redis(lambda ls=lines: self.ledger.status("erp", [ln.line_id for ln in ls]))  # type: ignore[misc]
            # Batches a previous process sent without seeing the answer: the same body again.
            lost: set[str] = set()  # keys whose written-ahead body expired: send their lines afresh
            for key in dict.fromkeys(st[len(PENDING) :] for st in statuses if st and st.startswith(PENDING)):
                body = self.redis(lambda k=key: self.ledger.intent("erp", k))  # type: ignore[misc]
                if body is None:
                    lost.add(PENDING + key)
                else:
                    self._post(key, [ln["line_id"] for ln in orjson.loads(body)["lines"]], body)
            fresh = [ln for ln, st in zip(lines, statuses, strict=True) if st is None or st in lost]
            DELIVERED.labels("erp", "skipped").inc(len(lines) - len(fresh))
            if fresh:
                ids = [ln.line_id for ln in fresh]
                key = batch_key(ids)
                body = ENCODER.encode({"batch_id": key, "lines": fresh})
                self.redis(lambda k=key, i=ids, b=body: self.ledger.intend("erp", k, i, b))  # type: ignore[misc]
                self._post(key, ids, body)

    def _post(self, key: str, ids: list[str], body: bytes) -> None:
        t0 = time.perf_counter()
        r = self.erp.send("/erp/usage-batches", body, {"Idempotency-Key": key})
        if not r.ok:
            self.park("erp", ids, body, r)
        result = "ok" if r.ok else "rejected"
        self.redis(lambda: self.ledger.ack("erp", ids, result))
        DELIVERED.labels("erp", result).inc(len(ids))
        self.batch.observe(len(ids))
        log.info(
            "erp batch posted" if r.ok else "erp batch rejected",
            extra={
                "batch_id": key,
                "lines": len(ids),
                "line_ids": ids,
                "status": r.status,
                "attempts": r.attempts,
                "ms": round((time.perf_counter() - t0) * 1000, 1),
            },
        )

    def close(self) -> None:
        self.erp.close()


class _Sink(DynamicSink[Any]):
    def __init__(self, make: Callable[[], StatelessSinkPartition[Any]]) -> None:
        self.make = make

    def build(self, step_id: str, worker_index: int, worker_count: int) -> StatelessSinkPartition[Any]:
        return self.make()


# Pending lines and when the first arrived: the batch being formed survives a restart.
BatchState = tuple[list[bytes], float | None]


class _ErpBatcher(StatefulBatchLogic[bytes, list[bytes], BatchState]):
    def __init__(self, max_items: int, max_latency: float, resume: BatchState | None) -> None:
        self.mb: MicroBatcher[bytes] = MicroBatcher(max_items, max_latency)
        if resume is not None:
            self.mb.items, self.mb.first_at = list(resume[0]), resume[1]

    def on_batch(self, values: list[bytes]) -> tuple[list[list[bytes]], bool]:
        now = time.time()
        out = [b for b in (self.mb.add(v, now) for v in values) if b]
        PENDING_LINES.set(len(self.mb.items))
        return out, self.RETAIN

    def on_notify(self) -> tuple[list[list[bytes]], bool]:
        b = self.mb.due(time.time())
        PENDING_LINES.set(len(self.mb.items))
        return ([b] if b else []), self.RETAIN

    def on_eof(self) -> tuple[list[list[bytes]], bool]:
        b = self.mb.take()
        PENDING_LINES.set(0)
        return ([b] if b else []), self.RETAIN

    def notify_at(self) -> datetime | None:
        d = self.mb.deadline()
        return datetime.fromtimestamp(d, UTC) if d is not None else None

    def snapshot(self) -> BatchState:
        return (list(self.mb.items), self.mb.first_at)


# A delivery consumer keeps little ahead of its sink: while a destination is down the
# backlog must wait in Kafka, not in this process.
DELIVERY_PREFETCH = {"queued.max.messages.kbytes": 4096, "queued.min.messages": 2000}


def _source(s: Settings, topic: str, end_offsets: Mapping[int, int] | None, name: str) -> KafkaBatchSource:
    cfg = {**DELIVERY_PREFETCH, **kafka_config(s)}
    group = f"{s.consumer_group_prefix}-{name}"
    return KafkaBatchSource(cfg, topic, batch_size=s.batch_size, start_from="earliest", end_offsets=end_offsets, group=group, label=name)


def build_alerts_flow(s: Settings, *, end_offsets: Mapping[int, int] | None = None) -> Dataflow:
    flow = Dataflow("tallyflow-alert-delivery")
    src = _source(s, s.alerts_topic, end_offsets, "alerts")
    op.output("deliver", op.input("alerts", flow, src), _Sink(lambda: _AlertPartition(s)))
    return flow


def build_erp_flow(s: Settings, *, end_offsets: Mapping[int, int] | None = None) -> Dataflow:
    flow = Dataflow("tallyflow-erp-delivery")
    src = _source(s, s.rated_topic, end_offsets, "erp")
    lines = op.flat_map("lines", op.input("rated", flow, src), lambda ms: [("erp", m.value() or b"") for m in ms])
    batches = op.stateful_batch("batch", lines, lambda resume: _ErpBatcher(s.erp_batch_max_lines, s.erp_batch_max_latency_seconds, resume))
    op.output("post", batches, _Sink(lambda: _ErpPartition(s)))
    return flow


def alerts_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.delivery:alerts_flow()"`."""
    s = load_settings()
    flow = build_alerts_flow(s)
    runtime.started(s, "alerts", ledger=_ledger_check)
    return flow


def erp_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.delivery:erp_flow()"`."""
    s = load_settings()
    flow = build_erp_flow(s)
    runtime.started(s, "erp", ledger=_ledger_check)
    return flow


def _ledger_up(up: bool) -> None:
    _LEDGER["up"] = up
    LEDGER_UP.set(int(up))


def _ledger_check() -> str | None:
    return None if _LEDGER["up"] else "Redis ledger unreachable; delivery held"


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()
