"""Traffic generator: realistic usage CloudEvents with duplicates, late and malformed ones.

Event time advances uniformly from `start` over `span`; tenant activity is skewed (a few
heavy tenants cross thresholds, most do not). Produces through confluent-kafka, keyed by
tenant, and reports the exclusive end offset of every partition it wrote to.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message

from runtime import kafka
from schemas.catalog import Catalog, Meter

DEFAULT_START = datetime(2026, 10, 31, 12, 0, tzinfo=UTC)


@dataclass
class GenSpec:
    total: int = 500_000
    tenants: int = 1000
    duplicate_pct: float = 1.0
    late_pct: float = 0.5
    malformed_pct: float = 0.1
    seed: int = 7
    start: datetime = DEFAULT_START
    span: timedelta = timedelta(hours=24)
    rate: float | None = None  # events/s; None = as fast as possible
    event_types: tuple[str, ...] | None = None  # only these types (None: every type the catalog meters)
    # Share of the tenants given prepaid credits before their traffic: 3 grants each (one
    # drawn last and expiring halfway through, one of first priority, one voided three
    # quarters through).
    credits: float = 0.0


@dataclass
class GenResult:
    produced: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class _Shape:
    """How to make the `data` of one event type, from the meters that read it."""

    etype: str
    weight: float
    fields: list[tuple[list[str], str]]  # (path in data, aggregation)


def _shapes(catalog: Catalog) -> list[_Shape]:
    by_type: dict[str, list[Meter]] = {}
    for m in catalog.meters:
        by_type.setdefault(m.event_type, []).append(m)
    shapes = []
    for etype, meters in sorted(by_type.items()):
        fields: list[tuple[list[str], str]] = [
            ((m.value_path or m.unique_path or "").split("."), m.aggregation) for m in meters if m.aggregation != "COUNT"
        ]
        dims = {d for m in meters for d in m.dimensions}
        fields += [(d.split("."), "DIMENSION") for d in sorted(dims)]
        aggs = {a for _, a in fields}
        # Request-like (COUNT only) traffic dominates, then SUM meters; gauges are rarer.
        # Payments are rarer than LLM calls.
        weight = 50 if not fields else (10 if any(p[-1] == "amount" for p, _ in fields) else 35) if "SUM" in aggs else 5
        shapes.append(_Shape(etype, weight, fields))
    return shapes


# A matrix meter's dimension values: a few heavy models, a long tail (8 in all).
MODELS = ["small", "large", "medium", "vision", "code", "embed", "audio", "xl"]
MODEL_WEIGHTS = [40, 25, 15, 8, 5, 4, 2, 1]


def _value(rng: random.Random, aggregation: str) -> Any:
    if aggregation == "SUM":
        return rng.randint(1, 2000)
    if aggregation == "DIMENSION":
        return rng.choices(MODELS, MODEL_WEIGHTS)[0]
    if aggregation in ("MAX", "AVG", "MIN"):
        # A float with two decimals: its shortest repr is exact, and the pipeline reads it as Decimal.
        return rng.randint(1, 50_000) / 100
    if aggregation == "UNIQUE_COUNT":
        return f"u-{rng.randint(1, 80)}"
    return rng.randint(1, 40)  # LATEST


def _data(rng: random.Random, shape: _Shape) -> dict[str, Any]:
    data: dict[str, Any] = {"origin": rng.choice(["web", "api", "batch"])}
    for path, aggregation in shape.fields:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        # A payment's amount is money: cents, up to a few hundred (a decimal string, exact).
        node[path[-1]] = f"{rng.randint(100, 40_000) / 100:.2f}" if path[-1] == "amount" else _value(rng, aggregation)
    return data


def _malformed(rng: random.Random, good: bytes, ev: dict[str, Any], shapes: list[_Shape]) -> tuple[str, bytes]:
    kind = rng.choice(["invalid_json", "schema", "unknown_tenant", "unknown_meter", "bad_quantity"])
    if kind == "invalid_json":
        return kind, good[: rng.randint(1, max(1, len(good) - 2))]
    bad = dict(ev)
    quantities = [(sh.etype, path) for sh in shapes for path, agg in sh.fields if agg in ("SUM", "MAX", "LATEST")]
    if kind == "bad_quantity" and quantities:
        etype, path = rng.choice(quantities)
        data: dict[str, Any] = {}
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = rng.choice([-5, "many", None])
        bad["type"], bad["data"] = etype, data
        return kind, orjson.dumps(bad)
    if kind == "unknown_tenant":
        bad["subject"] = "t-unknown"
    elif kind == "unknown_meter":
        bad["type"] = "video.minutes"
    else:
        kind = "schema"
        bad.pop(rng.choice(["subject", "time", "id", "specversion"]))
    return kind, orjson.dumps(bad)


def events(spec: GenSpec, catalog: Catalog) -> Iterator[tuple[str, str, bytes, str]]:
    """Yield (kind, tenant, value, event id) where kind is ok / duplicate / late / a dead-letter reason."""
    rng = random.Random(spec.seed)
    tenants = [t.tenant_id for t in catalog.tenants[: spec.tenants]]
    # Log-normal activity: a long tail of quiet tenants and a few heavy ones.
    weights = [math.exp(rng.gauss(0, 1.2)) for _ in tenants]
    shapes = [sh for sh in _shapes(catalog) if spec.event_types is None or sh.etype in spec.event_types]
    step = spec.span / max(spec.total, 1)
    recent: list[tuple[str, bytes, str]] = []
    tenant_pick = rng.choices(tenants, weights, k=spec.total)
    shape_pick = rng.choices(shapes, [sh.weight for sh in shapes], k=spec.total)
    granted = _grantees(spec, catalog, tenants)
    for tenant, currency in granted:
        yield from _grants(spec, tenant, currency)
    for i in range(spec.total):
        if granted and i == spec.total * 3 // 4:
            for tenant, _ in granted:
                yield _void(spec, tenant, f"{spec.seed}-{tenant}-big", spec.start + spec.span * 3 / 4)
        r = rng.random() * 100
        if r < spec.duplicate_pct and recent:
            tenant, value, eid = recent[rng.randrange(len(recent))]
            yield "duplicate", tenant, value, eid
            continue
        tenant, shape = tenant_pick[i], shape_pick[i]
        etype = shape.etype
        t = spec.start + step * i
        kind = "ok"
        if r < spec.duplicate_pct + spec.late_pct:
            kind = "late"
            # Mostly minutes late (corrections); a fifth hours late (too late past a period end).
            back = timedelta(minutes=rng.uniform(2, 40)) if rng.random() < 0.8 else timedelta(hours=rng.uniform(2, 3))
            t -= back
        eid = f"{spec.seed}-{i}"
        ev: dict[str, Any] = {
            "specversion": "1.0",
            "id": eid,
            "source": f"svc/{etype.split('.')[0]}",
            "type": etype,
            "subject": tenant,
            "time": _iso(t),
            "data": _data(rng, shape),
        }
        value = orjson.dumps(ev)
        if r >= 100 - spec.malformed_pct:
            kind, value = _malformed(rng, value, ev, shapes)
        elif len(recent) < 2000:
            recent.append((tenant, value, eid))
        else:
            recent[rng.randrange(2000)] = (tenant, value, eid)
        yield kind, tenant, value, eid


GRANT_SOURCE = "svc/billing"


def _grantees(spec: GenSpec, catalog: Catalog, tenants: list[str]) -> list[tuple[str, str]]:
    """The tenants given credits (every n-th, deterministic), with their plan's currency."""
    if spec.credits <= 0:
        return []
    every = max(1, round(1 / spec.credits))
    currency = {p.id: p.currency for p in catalog.plans}
    plan_of = {t.tenant_id: t.plan for t in catalog.tenants}
    return [(t, currency[plan_of[t]]) for i, t in enumerate(tenants) if i % every == 0]


def credit_events(spec: GenSpec, catalog: Catalog) -> int:
    """How many grant and void events the traffic holds (besides its `total` usage events)."""
    return 4 * len(_grantees(spec, catalog, [t.tenant_id for t in catalog.tenants[: spec.tenants]]))


def _credit(spec: GenSpec, tenant: str, etype: str, eid: str, at: datetime, data: dict[str, Any]) -> tuple[str, str, bytes, str]:
    ev = {"specversion": "1.0", "id": eid, "source": GRANT_SOURCE, "type": etype, "subject": tenant, "time": _iso(at), "data": data}
    return "grant" if etype.endswith("granted") else "void", tenant, orjson.dumps(ev), eid


def _grants(spec: GenSpec, tenant: str, currency: str) -> Iterator[tuple[str, str, bytes, str]]:
    start = _iso(spec.start - timedelta(days=1))
    base = f"{spec.seed}-{tenant}"
    grants = [
        # Drawn last (after the large one), so it expires halfway with most of it unused.
        {"grant_id": f"{base}-trial", "amount": "5.00", "priority": 30, "expires_at": _iso(spec.start + spec.span / 2)},
        {"grant_id": f"{base}-promo", "amount": "3.00", "priority": 1},
        {"grant_id": f"{base}-big", "amount": "500.00", "priority": 20},
    ]
    for g in grants:
        data = {**g, "currency": currency, "effective_at": start}
        yield _credit(spec, tenant, "tallyflow.credit.granted", f"grant-{g['grant_id']}", spec.start, data)


def _void(spec: GenSpec, tenant: str, grant_id: str, at: datetime) -> tuple[str, str, bytes, str]:
    return _credit(spec, tenant, "tallyflow.credit.voided", f"void-{grant_id}", at, {"grant_id": grant_id})


def produce(
    brokers: str,
    topic: str,
    spec: GenSpec,
    catalog: Catalog,
    *,
    config: Mapping[str, Any] | None = None,
    progress: bool = False,
    record: list[bytes] | None = None,
    sent_at: dict[str, float] | None = None,
) -> GenResult:
    """Produce the generated traffic; returns counts by kind and exact end offsets.
    `record` collects the values, `sent_at` the time each event id was first produced."""
    res = GenResult()
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
            return
        p, o = msg.partition(), msg.offset()
        assert p is not None and o is not None  # set on every delivered message
        if o + 1 > res.end_offsets.get(p, 0):
            res.end_offsets[p] = o + 1

    producer = kafka.producer(
        {"bootstrap.servers": brokers, **(config or {})}, **{"linger.ms": 20, "queue.buffering.max.messages": 500_000}
    )
    bar = _bar(spec.total) if progress else None
    t0 = time.monotonic()
    n = 0
    for n, (kind, tenant, value, eid) in enumerate(events(spec, catalog), 1):
        res.kinds[kind] = res.kinds.get(kind, 0) + 1
        if record is not None:
            record.append(value)
        if sent_at is not None:
            sent_at.setdefault(eid, time.time())
        _produce(producer, topic, value, tenant.encode(), on_delivery)
        if n % 5000 == 0:
            producer.poll(0)
            if bar is not None:
                bar.update(5000)
            if spec.rate:
                ahead = n / spec.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)  # pacing to the requested rate
    producer.flush()
    if bar is not None:
        bar.update(spec.total - bar.n)
        bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} events were not delivered, first: {errors[0]}")
    res.produced = n  # the events, and any grants and voids
    res.seconds = time.monotonic() - t0
    return res


def _bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, desc="generate", mininterval=0.5)


def _produce(producer: Any, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)
