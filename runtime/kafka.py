"""Every Kafka client Tallyflow makes, in one place: our defaults, then the user's
pass-through settings (theirs win), librdkafka's log routed to Python logging, a check that
the brokers answer before a command starts working, topic creation, and reading a topic to
its end."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic  # type: ignore[attr-defined]

from schemas.errors import TallyflowError

# Measured on the local broker: the 1000 ms default stalls consumers at ~290k msg/s.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "group.id": "tallyflow-unused",  # required by librdkafka; partitions are assigned, not subscribed
    "enable.auto.commit": False,
    "enable.partition.eof": False,
    "fetch.queue.backoff.ms": 10,
    "fetch.wait.max.ms": 10,
    "queued.max.messages.kbytes": 65536,
}
PRODUCER_DEFAULTS: dict[str, Any] = {"compression.type": "lz4", "linger.ms": 5, "batch.num.messages": 10000, "enable.idempotence": True}
RDKAFKA_LOG = logging.getLogger("librdkafka")


class _Repeats(logging.Filter):
    """librdkafka logs every failed connection attempt; one line per distinct complaint per
    minute says as much."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        key = msg.split("]: ", 1)[-1][:60]
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.every_s:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = now
        return True


RDKAFKA_LOG.addFilter(_Repeats())


class BrokerUnreachable(TallyflowError):
    """The configured brokers did not answer; the message names the setting and the address."""


Config = Mapping[str, Any] | str  # librdkafka settings, or just the bootstrap servers


def _base(config: Config) -> dict[str, Any]:
    return {"logger": RDKAFKA_LOG, **(config if not isinstance(config, str) else {"bootstrap.servers": config})}


def consumer(config: Config, **ours: Any) -> Consumer:
    return Consumer({**CONSUMER_DEFAULTS, **ours, **_base(config)})


def producer(config: Config, **ours: Any) -> Producer:
    return Producer({**PRODUCER_DEFAULTS, **ours, **_base(config)})


def admin(config: Config) -> AdminClient:
    return AdminClient(_base(config))


def ensure_reachable(config: Config, timeout_s: float = 10.0) -> None:
    """Fail fast, with one line, when the brokers do not answer (instead of librdkafka
    retrying forever with a log line per attempt)."""
    cfg = _base(config)
    servers = cfg.get("bootstrap.servers", "")
    errors: list[str] = []
    on_error: Any = lambda e: errors.append(str(e.str()))  # noqa: E731
    a = AdminClient({**cfg, "error_cb": on_error})
    try:
        a.list_topics(timeout=timeout_s)
    except KafkaException as e:
        why = errors[-1] if errors else str(e.args[0].str() if e.args and hasattr(e.args[0], "str") else e)
        raise BrokerUnreachable(
            f"cannot reach the Kafka brokers at {servers} within {timeout_s:g}s ({why}); "
            "start them, or set TALLYFLOW_BROKERS to where they are"
        ) from None


@dataclass
class TopicResult:
    name: str
    partitions: int
    created: bool
    problem: str = ""  # why it has fewer partitions than asked


def ensure_topics(config: Config, topics: Mapping[str, int], timeout_s: float = 15.0) -> list[TopicResult]:
    """Create topics that do not exist yet (name -> partitions); an existing topic with
    fewer partitions than asked gets more where the broker can add them. Each result says
    what the topic has now, and why when that is fewer than asked."""
    a = admin(config)
    md = a.list_topics(timeout=timeout_s).topics
    out: list[TopicResult] = []
    new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in md]
    for name, fut in a.create_topics(new).items() if new else []:
        try:
            fut.result(timeout_s)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TallyflowError(f"could not create topic {name}: {e.args[0].str()}") from None
    grow = {name: n for name, n in topics.items() if name in md and len(md[name].partitions) < n}
    problems: dict[str, str] = {}
    for name, fut in a.create_partitions([NewPartitions(name, n) for name, n in grow.items()]).items() if grow else []:
        try:
            fut.result(timeout_s)
        except KafkaException as e:
            problems[name] = f"the broker did not add partitions: {e.args[0].str()}"
    for name, n in topics.items():
        had = len(md[name].partitions) if name in md else 0
        out.append(TopicResult(name, had if name in problems else max(n, had), name not in md, problems.get(name, "")))
    return out


def read_topic(config: Config, topic: str, *, timeout_s: float = 30.0) -> list[bytes]:
    """All values of `topic` from the beginning to the end of every partition.

    The end is the partition-EOF event of the fetch response, which is exact on the local
    broker (its ListOffsets high watermark trails the log end, so that is not used)."""
    c = _eof_consumer(config)
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[bytes] = []
        read_to_eof(c, topic, parts, timeout_s, lambda m: out.append(m.value() or b""))
        return out
    finally:
        c.close()


def log_ends(config: Config, topic: str, *, timeout_s: float = 30.0) -> dict[int, int]:
    """The exclusive end offset of every partition now: where a bounded replay stops.

    Reads from the reported high watermark (which may trail on the local broker) to the
    partition-EOF event, so the answer is exact without reading the whole log."""
    c = _eof_consumer(config)
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        ends: dict[int, int] = {}
        for p in parts:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = max(high, 0)
        c.assign([TopicPartition(topic, p, ends[p]) for p in parts])

        def last(m: Message) -> None:
            ends[m.partition() or 0] = (m.offset() or 0) + 1

        read_to_eof(c, topic, parts, timeout_s, last)
        return ends
    finally:
        c.close()


def partitions_to_end(config: Config, topic: str, *, batch: int = 10_000, timeout_s: float = 60.0) -> Iterator[tuple[int, list[Message]]]:
    """Each partition of `topic` from the beginning to its end, one after the other, in
    offset order and in chunks: what a recount that must see a partition in order reads."""
    c = _eof_consumer(config)
    try:
        for p in sorted(c.list_topics(topic, timeout=10).topics[topic].partitions):
            c.assign([TopicPartition(topic, p, 0)])
            for chunk in _chunks(c, topic, p, batch, timeout_s):
                yield p, chunk
    finally:
        c.close()


def _chunks(c: Consumer, topic: str, part: int, batch: int, timeout_s: float) -> Iterator[list[Message]]:
    """Chunks of one assigned partition until its EOF."""
    deadline = time.monotonic() + timeout_s
    done = False
    while not done:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}[{part}]: no end of partition within {timeout_s}s")
        chunk: list[Message] = []
        for m in c.consume(batch, 0.5):
            err = m.error()
            if err is None:
                chunk.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:
                done = True
            else:
                raise RuntimeError(f"{topic}[{part}]: {err}")
        if chunk:
            yield chunk


def _eof_consumer(config: Config) -> Consumer:
    return consumer(config, **{"group.id": f"tallyflow-read-{uuid.uuid4()}", "enable.partition.eof": True})


def read_to_eof(c: Consumer, topic: str, parts: list[int], timeout_s: float, on_message: Callable[[Message], None]) -> None:
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


def produce_confirmed(config: Config, records: Iterable[tuple[str, bytes, bytes | None]], what: str) -> int:
    """Produce (topic, value, key) records and wait until the broker confirmed every one
    (a re-drive tells the person only what really went back)."""
    p = producer(config)
    n = 0
    for topic, value, key in records:
        p.produce(topic, value, key)
        p.poll(0)
        n += 1
    left = p.flush(30)
    if left:
        raise RuntimeError(f"{left} {what} not confirmed by the broker; run the re-drive again")
    return n
