"""Turn raw Kafka message bytes into accepted usage or dead letters with a reason.

Any byte string yields dead letters or accepted events: a bad element inside a JSON array
is dead-lettered alone, so its neighbours still count (SPEC §3.7).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import msgspec

from operators.catalog_index import CatalogIndex
from operators.stats import Stats
from schemas.events import CloudEvent, EventDecoder, Quantity, UniqueValue
from schemas.outputs import DeadLetter, DeadLetterReason


class Accepted(msgspec.Struct, gc=False):
    """A schema-valid, enriched event on its way to its tenant's shard. It holds ids, not
    catalog objects, because batches cross workers."""

    tenant_id: str
    pricing_version: str
    key: str  # dedup key within the tenant: source + id
    event_id: str
    ts_ms: int
    values: list[tuple[str, Any]]  # (meter slug, quantity or unique value)
    payload: bytes
    topic: str
    partition: int
    offset: int
    index: int | None
    seen: bool = False  # the long-horizon dedup store has this key from another position
    asked: bool = False  # the store was asked (and so has recorded it)


class _Reject(Exception):
    """A judgement on one event; caught once in `_one`, where the dead letter is written."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        self.reason, self.message = reason, message


# (meter slug, reads the quantity from the event or None for COUNT, is a quantity)
Reader = tuple[str, Callable[[Any], Any] | None, bool]


def _classify(e: msgspec.ValidationError) -> DeadLetterReason:
    msg = str(e)
    if "Invalid value" in msg and msg.endswith(".type`"):
        return "unknown_meter"
    if ".data" in msg or "field `data`" in msg:
        return "bad_quantity"
    return "schema"


class Validator:
    """Stateless per message: decode, check schema, resolve tenant, plan and meters."""

    def __init__(self, catalog: CatalogIndex, stats: Stats) -> None:
        self.cat = catalog
        self.stats = stats
        fields: dict[str, list[tuple[str, Any]]] = {}
        readers: dict[str, list[Reader]] = {}
        for etype, specs in catalog.meters_by_type.items():
            fields[etype], readers[etype] = [], []
            for spec in specs:
                m = spec.meter
                if m.aggregation == "COUNT":
                    readers[etype].append((m.slug, None, True))
                    continue
                path, typ = (m.unique_path, UniqueValue) if m.aggregation == "UNIQUE_COUNT" else (m.value_path, Quantity)
                assert path is not None
                fields[etype].append((path, typ))
                readers[etype].append((m.slug, operator.attrgetter(f"data.{path}"), typ is Quantity))
        self.decoder = EventDecoder(fields)
        self.readers = {cls: readers[etype] for cls, etype in self.decoder.classes.items()}
        self._tenants = catalog.tenants
        # Per pricing version and event class: the readers of the meters that plan prices.
        self._plan_readers: dict[str, dict[type, list[Reader]]] = {
            pv: {cls: [r for r in rs if r[0] in plan.meters] for cls, rs in self.readers.items()}
            for pv, plan in catalog.plans_by_version.items()
        }

    def parse_batch(
        self,
        values: Iterable[tuple[bytes | None, int]],
        topic: str,
        partition: int,
        received_at: str,
        accepted: list[Accepted],
        dead: list[DeadLetter],
    ) -> None:
        """Judge (value, offset) pairs from one topic partition; append outcomes in order."""
        decode = self.decoder.single_or_batch.decode
        one = self._one
        n0 = len(accepted)
        for value, offset in values:
            try:
                decoded = decode(value or b"")
            except (msgspec.DecodeError, UnicodeDecodeError):
                self._parse_slow(value, topic, partition, offset, received_at, accepted, dead)
                continue
            if type(decoded) is list:
                self._parse_slow(value, topic, partition, offset, received_at, accepted, dead)
            else:
                one(decoded, value, topic, partition, offset, None, received_at, accepted, dead)  # type: ignore[arg-type]
        self.stats.records_in += len(accepted) - n0  # dead letters count themselves in _dead

    def _parse_slow(
        self,
        value: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        received_at: str,
        accepted: list[Accepted],
        dead: list[DeadLetter],
    ) -> None:
        """What the fast path leaves: arrays, and messages that failed to decode."""
        payload = value or b""
        try:
            decoded = self.decoder.single_or_batch.decode(payload)
        except msgspec.ValidationError as e:
            if payload.lstrip()[:1] != b"[":
                return self._dead(dead, _classify(e), f"{e}", payload, topic, partition, offset, received_at)
            self._elements(payload, topic, partition, offset, received_at, accepted, dead)
            return
        except msgspec.DecodeError as e:
            msg = f"not JSON: {e}" if payload else "empty message (a tombstone?)"
            return self._dead(dead, "invalid_json", msg, payload, topic, partition, offset, received_at)
        except UnicodeDecodeError as e:
            return self._dead(dead, "invalid_json", f"not UTF-8: {e}", payload, topic, partition, offset, received_at)
        if isinstance(decoded, list):
            if not decoded:
                return self._dead(dead, "schema", "an empty JSON array holds no events", payload, topic, partition, offset, received_at)
            for i, ev in enumerate(decoded):
                # Elements share the message as payload; `index` says which one a dead letter is.
                self._one(ev, payload, topic, partition, offset, i, received_at, accepted, dead)
        else:
            self._one(decoded, payload, topic, partition, offset, None, received_at, accepted, dead)

    def _elements(
        self, payload: bytes, topic: str, partition: int, offset: int, received_at: str, accepted: list[Accepted], dead: list[DeadLetter]
    ) -> None:
        """Slow path for an array with a bad element: judge each element on its own."""
        try:
            elements = self.decoder.raw_array.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:  # e.g. b"[0": a bad element seen before the truncation
            return self._dead(dead, "invalid_json", f"not JSON: {e}", payload, topic, partition, offset, received_at)
        for i, raw in enumerate(elements):
            try:
                ev = self.decoder.one.decode(raw)
            except msgspec.ValidationError as e:
                self._dead(dead, _classify(e), f"{e}", bytes(raw), topic, partition, offset, received_at, i)
                continue
            except UnicodeDecodeError as e:
                self._dead(dead, "invalid_json", f"not UTF-8: {e}", bytes(raw), topic, partition, offset, received_at, i)
                continue
            self._one(ev, bytes(raw), topic, partition, offset, i, received_at, accepted, dead)

    def _dead(
        self,
        dead: list[DeadLetter],
        reason: DeadLetterReason,
        message: str,
        raw: bytes,
        topic: str,
        partition: int,
        offset: int,
        received_at: str,
        index: int | None = None,
        ev: CloudEvent | None = None,
    ) -> None:
        self.stats.records_in += 1
        self.stats.dead[reason] += 1
        dead.append(
            DeadLetter(
                reason=reason,
                message=message,
                payload=raw,
                topic=topic,
                partition=partition,
                offset=offset,
                received_at=received_at,
                index=index,
                event_id=ev.id if ev else None,
                tenant_id=ev.subject if ev else None,
            )
        )

    def _one(
        self,
        ev: Any,
        raw: bytes,
        topic: str,
        partition: int,
        offset: int,
        index: int | None,
        received_at: str,
        accepted: list[Accepted],
        dead: list[DeadLetter],
    ) -> None:
        try:
            tenant = self._tenants.get(ev.subject)
            if tenant is None:
                raise _Reject("unknown_tenant", f"tenant '{ev.subject}' is not in the catalog")
            ts = ev.time.timestamp()
            if ts < 0:
                raise _Reject("schema", f"event time {ev.time.isoformat()} is before 1970")
            # Exact floor to the millisecond for µs-precision times: the float's error after the
            # multiplication stays below 0.0005 ms until 2100, and the fraction is a multiple of 0.001.
            ts_ms = int(ts * 1000 + 0.0005)
            plan = tenant.only_plan or tenant.plan_at(ts_ms)
            if plan is None or (tenant.until_ms is not None and ts_ms >= tenant.until_ms):
                raise _Reject("unknown_tenant", f"tenant '{ev.subject}' has no contract in force at {ev.time.isoformat()}")
            readers = self._plan_readers[plan.pricing_version][type(ev)]
            if not readers:
                raise _Reject("unknown_meter", f"plan '{plan.pricing_version}' prices no meter of type '{self.decoder.classes[type(ev)]}'")
            values: list[tuple[str, Any]] = []
            for slug, read, is_qty in readers:
                if read is None:
                    values.append((slug, 1))
                    continue
                v = read(ev)
                if is_qty and type(v) is Decimal and (not v.is_finite() or v < 0):
                    raise _Reject("bad_quantity", f"meter '{slug}' needs a finite non-negative quantity, got {v}")
                values.append((slug, v))
        except _Reject as r:
            return self._dead(dead, r.reason, r.message, raw, topic, partition, offset, received_at, index, ev)
        accepted.append(
            Accepted(
                ev.subject, plan.pricing_version, f"{ev.source}\x1f{ev.id}", ev.id, ts_ms, values, raw, topic, partition, offset, index
            )
        )
