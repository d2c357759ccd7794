"""The rating dataflow's operators in a plain loop: one consumer, the same validator and
engines, outputs produced to the same topics, no Bytewax. `make bench` reports it beside the
dataflow (what Bytewax costs) and the lean loop (what Python costs)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import TopicPartition

from operators.catalog_index import CatalogIndex
from operators.engine import ShardEngine
from operators.engine_state import Out
from operators.periods import iso
from operators.sharding import Sharder
from operators.stats import Stats
from operators.validate import Validator
from runtime import kafka
from runtime.settings import Settings
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER


def run(s: Settings, end_offsets: Mapping[int, int]) -> Stats:
    """The bar: one consumer, the same operators, outputs produced to the same topics."""

    stats = Stats()
    cat = CatalogIndex.build(load_catalog(s.process.catalog))
    validator = Validator(cat, stats, s.limits)
    cfg = s.engine.config()
    engines: dict[str, ShardEngine] = {}
    sharder = Sharder(s.engine.shards)
    consumer = kafka.consumer(s.kafka.brokers)
    consumer.assign([TopicPartition(s.topics.input, p, 0) for p in end_offsets])
    producer = kafka.producer(s.kafka.brokers)
    remaining = {p: e for p, e in end_offsets.items() if e > 0}

    def emit(topic: str, items: list[Any]) -> None:
        for it in items:
            while True:
                try:
                    producer.produce(topic, ENCODER.encode(it), it.tenant_id.encode() if it.tenant_id else None)
                    break
                except BufferError:
                    producer.poll(0.05)

    def emit_out(o: Out) -> None:
        emit(s.topics.alerts, o.alerts)
        emit(s.topics.rated, o.lines)
        emit(s.topics.dlq, o.dead)

    while remaining:
        msgs = consumer.consume(s.kafka.batch_size, 0.1)
        if not msgs:
            continue
        now = time.time()
        received = iso(int(now * 1000))
        by_part: dict[int, list[Any]] = {}
        for m in msgs:
            p, off = m.partition(), m.offset()
            if m.error() is None and p is not None and off is not None:
                by_part.setdefault(p, []).append(m)
        for p, vals in by_part.items():
            groups, dead = validator.route(vals, s.topics.input, p, received, int(now * 1000), sharder)
            if (vals[-1].offset() or 0) + 1 >= remaining.get(p, 0):
                remaining.pop(p, None)
            emit(s.topics.dlq, dead)
            for shard, batch in groups.items():
                eng = engines.get(shard)
                if eng is None:
                    eng = engines[shard] = ShardEngine(validator, cfg, stats)
                emit_out(eng.process(batch, s.topics.input, p, now, received))
        producer.poll(0)
    for eng in engines.values():
        emit_out(eng.flush_all())
    producer.flush()
    consumer.close()
    return stats
