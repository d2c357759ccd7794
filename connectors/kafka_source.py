"""The Kafka source for Bytewax that moves whole batches per item.

Bytewax's own KafkaSource yields one item per message, which caps a worker near 100k
events/s; yielding one list per consume() call lets the operators work per batch.
Offsets live in Bytewax recovery snapshots, as with the built-in connector. With a `group`,
the read positions are also committed to that consumer group at every snapshot, for lag
tooling only (kafka-consumer-groups, KEDA's Kafka scaler); resuming never reads them.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime import kafka
from runtime.health import HEALTH
from runtime.metrics import BATCH_SIZE
from runtime.settings import KafkaSettings

log = logging.getLogger(__name__)

_IDLE_BACKOFF = timedelta(milliseconds=5)
Record = tuple[str, bytes | None, bytes]  # (topic, key, value)


class Backlog:
    """Whether input is waiting in this process: consumes that keep filling whole batches
    mean more is queued behind them (the process is catching up, or at its limit). One full
    batch is not a backlog (a pause of a few milliseconds leaves one); `STREAK` in a row
    are. Work that can wait (the read model) yields to the input then."""

    STREAK = 8
    __slots__ = ("full_at", "streak")

    def __init__(self) -> None:
        self.full_at = -1e9
        self.streak = 0

    def saw(self, n: int, batch_size: int) -> None:
        if n < batch_size:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.STREAK:
            self.full_at = time.monotonic()

    def behind(self, within_s: float = 1.0) -> bool:
        return time.monotonic() - self.full_at < within_s


BACKLOG = Backlog()  # per process: its workers share one interpreter (and one GIL)


class _Partition(StatefulSourcePartition[list[Message], int]):
    def __init__(
        self, config: dict[str, Any], topic: str, part: int, offset: int, end: int | None, batch_size: int, commit: bool, label: str
    ) -> None:
        self._consumer = kafka.consumer(config)
        self._tp = TopicPartition(topic, part, offset)
        self._consumer.assign([self._tp])
        self._next = offset
        self._end = end
        self._batch_size = batch_size
        self._idle = False
        self._commit = commit
        self._batch = BATCH_SIZE.labels(label, "consume")
        _LIVE.add(self)

    def next_batch(self) -> list[list[Message]]:
        # `_next` may still be symbolic (OFFSET_BEGINNING < 0): an empty bounded partition ends at once.
        if self._end is not None and (self._end <= 0 or self._next >= self._end):
            raise StopIteration
        # Never block: one worker polls all its partitions in turn, and a wait on an empty
        # one would stall the others. next_awake() backs off instead when idle.
        msgs = self._consumer.consume(self._batch_size, 0)
        self._idle = not msgs
        BACKLOG.saw(len(msgs), self._batch_size)
        good: list[Message] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal() or not err.retriable():
                    raise KafkaException(err)
                log.warning("kafka consumer: %s", err)
                continue
            off = m.offset()
            assert off is not None  # always set on a message without error
            if self._end is not None and off >= self._end:
                break
            good.append(m)
            self._next = off + 1
        if good:
            self._batch.observe(len(good))
            return [good]
        return []

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + _IDLE_BACKOFF if self._idle else None

    def snapshot(self) -> int:
        if self._commit and self._next >= 0:
            tp = TopicPartition(self._tp.topic, self._tp.partition, self._next)
            self._consumer.commit(offsets=[tp], asynchronous=True)
        return self._next

    def lag(self) -> int | None:
        """Messages between the read position and the high watermark, asked of the broker
        now: a worker blocked in its sink (an outage) must not freeze the backlog it shows."""
        if self._next < 0:
            return None
        try:
            _, high = self._consumer.get_watermark_offsets(self._tp, timeout=2, cached=False)
        except KafkaException:
            return None
        return max(0, high - self._next) if high >= 0 else None

    def close(self) -> None:
        _LIVE.discard(self)
        self._consumer.close()


_LIVE: weakref.WeakSet[_Partition] = weakref.WeakSet()


class _LagCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "tallyflow_consumer_lag_messages",
            "Messages between this worker's read position and the partition's high watermark (backlog in Kafka).",
            labels=["topic", "partition"],
        )
        for part in list(_LIVE):
            n = part.lag()
            if n is not None:
                g.add_metric([part._tp.topic, str(part._tp.partition)], n)
        yield g


REGISTRY.register(_LagCollector())


class KafkaBatchSource(FixedPartitionedSource[list[Message], int]):
    """One partition per Kafka partition; each item is a list of up to `batch_size` messages.

    `end_offsets` (partition -> exclusive end) makes the input bounded: the demo and the
    tests stop exactly where they finished producing, without trusting watermarks.
    `start_offsets` (partition -> first offset) is where a replay begins; a recovery
    snapshot, when there is one, wins over both start settings.
    """

    def __init__(
        self,
        cfg: KafkaSettings,
        topic: str,
        *,
        label: str,
        commit_positions: bool = True,
        end_offsets: Mapping[int, int] | None = None,
        start_offsets: Mapping[int, int] | None = None,
        client: Mapping[str, Any] | None = None,
    ) -> None:
        """`label` names the dataflow (metrics, and the consumer group `<prefix>-<label>` its
        positions are committed to unless `commit_positions` is off); `client` adds our own
        librdkafka settings under the user's."""
        self._config = cfg.config(**(client or {}))
        self._commit = commit_positions
        if commit_positions:
            self._config["group.id"] = f"{cfg.consumer_group_prefix}-{label}"
        self._label = label
        self._begin = dict(start_offsets) if start_offsets is not None else None
        self._topic = topic
        self._batch_size = cfg.batch_size
        self._start = OFFSET_BEGINNING if cfg.start_from == "earliest" else OFFSET_END
        self._end = dict(end_offsets) if end_offsets is not None else None

    def list_parts(self) -> list[str]:
        probe = kafka.consumer(self._config)  # the very settings the partitions will use (TLS, SASL, ...)
        try:
            t = probe.list_topics(self._topic, timeout=10).topics.get(self._topic)
        finally:
            probe.close()
        if t is None or t.error is not None or not t.partitions:
            raise RuntimeError(
                f"input topic '{self._topic}' does not exist on {self._config.get('bootstrap.servers')}; "
                "create it (tallyflow topics) or set TALLYFLOW_INPUT_TOPIC"
            )
        HEALTH.running = True  # every worker lists the partitions once the cluster has formed
        return [f"{p}-{self._topic}" for p in sorted(t.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Partition:
        part = int(for_part.split("-", 1)[0])
        end = None if self._end is None else self._end.get(part, 0)
        start = self._start if self._begin is None else self._begin.get(part, self._start)
        offset = resume_state if resume_state is not None else start
        return _Partition(self._config, self._topic, part, offset, end, self._batch_size, self._commit, self._label)
