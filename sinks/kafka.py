"""The Kafka outbox: where the rating dataflow writes alerts, rated lines and dead letters.

It answers like every destination, but its retries are librdkafka's own (an idempotent
producer): a record the cluster still refuses after them stops the process, which resumes
from its last snapshot. A record the producer or the broker refuses as too large is made
smaller where its topic knows how (`shrink`: dead letters cut their payload further) and
written again; nothing else is ever dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message

from runtime import kafka
from sinks.base import Answer

log = logging.getLogger(__name__)
Record = tuple[str, bytes | None, bytes]  # (topic, key, value)
Shrink = Callable[[bytes], bytes]
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}


class KafkaOutbox:
    name = "kafka"

    def __init__(self, config: Mapping[str, Any], shrink: Mapping[str, Shrink] | None = None) -> None:
        self.producer = kafka.producer(config)
        self.shrink = dict(shrink or {})
        self._errors: list[tuple[KafkaError, Message]] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append((err, msg))

    def produce(self, items: Sequence[Record]) -> None:
        """Hand records to the producer, which sends them at once (`send` then waits)."""
        for topic, k, value in items:
            self._produce(topic, value, k)

    def send(self, key: str, items: Sequence[Record]) -> Answer:
        """Produce and flush: once this returns, the broker has every record (also those
        handed over earlier with `produce`)."""
        self.produce(items)
        # Flushing before returning is what makes the next recovery snapshot safe:
        # nothing is acknowledged upstream until the broker has it.
        self.producer.flush()
        while self._errors:
            errs, self._errors = self._errors, []
            fatal = [f"{m.topic()}: {e}" for e, m in errs if e.code() not in _TOO_LARGE or m.topic() not in self.shrink]
            if fatal:
                raise KafkaException(f"{len(fatal)} output records were not delivered, first: {fatal[0]}")
            for _, m in errs:  # the broker's own limit is below ours: write them smaller
                topic = m.topic() or ""
                self._produce(topic, self._smaller(topic, m.value() or b""), m.key())
            self.producer.flush()
        return Answer()

    def _produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        p = self.producer
        while True:
            try:
                p.produce(topic, value, key, on_delivery=self._on_delivery)
                return
            except BufferError:
                p.poll(0.05)
            except KafkaException as e:
                if e.args[0].code() not in _TOO_LARGE or topic not in self.shrink:
                    raise
                value = self._smaller(topic, value)

    def _smaller(self, topic: str, value: bytes) -> bytes:
        smaller = self.shrink[topic](value)
        if len(smaller) >= len(value):
            raise KafkaException(f"{topic}: a record of {len(value):,} bytes is too large and cannot be made smaller")
        log.warning("%s: a record of %d bytes was too large; wrote it cut to %d bytes", topic, len(value), len(smaller))
        return smaller

    def close(self) -> None:
        self.producer.flush()
