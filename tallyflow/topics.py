"""Reading a topic back to its end (demo summary, tests, reconciliation)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from dataflows.kafka_io import CONSUMER_DEFAULTS


def read_topic(brokers: str, topic: str, *, timeout_s: float = 30.0, config: Mapping[str, Any] | None = None) -> list[bytes]:
    """All values of `topic` from the beginning to the end of every partition.

    The end is the partition-EOF event of the fetch response, which is exact on the local
    broker (its ListOffsets high watermark trails the log end, so that is not used)."""
    c = _eof_consumer(brokers, config)
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(md.partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[bytes] = []
        _to_eof(c, topic, parts, timeout_s, lambda m: out.append(m.value() or b""))
        return out
    finally:
        c.close()


def log_ends(brokers: str, topic: str, *, timeout_s: float = 30.0, config: Mapping[str, Any] | None = None) -> dict[int, int]:
    """The exclusive end offset of every partition now: where a bounded replay stops.

    Reads from the reported high watermark (which may trail on the local broker) to the
    partition-EOF event, so the answer is exact without reading the whole log."""
    c = _eof_consumer(brokers, config)
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        ends: dict[int, int] = {}
        for p in parts:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = max(high, 0)
        c.assign([TopicPartition(topic, p, ends[p]) for p in parts])

        def last(m: Message) -> None:
            ends[m.partition() or 0] = (m.offset() or 0) + 1

        _to_eof(c, topic, parts, timeout_s, last)
        return ends
    finally:
        c.close()


def _eof_consumer(brokers: str, config: Mapping[str, Any] | None) -> Consumer:
    return Consumer(
        {
            **CONSUMER_DEFAULTS,
            "bootstrap.servers": brokers,
            "group.id": f"tallyflow-read-{uuid.uuid4()}",
            "enable.partition.eof": True,
            **(config or {}),
        }
    )


def _to_eof(c: Consumer, topic: str, parts: list[int], timeout_s: float, on_message: Callable[[Message], None]) -> None:
    """Consume the assigned partitions until each reports partition EOF."""
    done: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(done) < len(parts):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: no end of partitions {sorted(set(parts) - done)} within {timeout_s}s")
        for m in c.consume(10_000, 0.2):
            err = m.error()
            part = m.partition()
            assert part is not None
            if err is None:
                on_message(m)
                done.discard(part)
            elif err.code() == KafkaError._PARTITION_EOF:
                done.add(part)
            else:
                raise RuntimeError(f"{topic}: {err}")
