"""Producers as they are (issue 23): CloudEvents encoded by the official Python SDK
(cloudevents 2.x, `cloudevents.core.bindings.kafka`) in structured and binary content mode,
through a real broker and the rating dataflow. Binary mode (attributes in `ce_*` headers,
the body is the data) is accepted like structured; a broken binary event is a dead letter
that keeps the headers it was sent with, so it can be read and re-driven as it was."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer

from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.outputs import DeadLetter
from tests.support.flows import rated_lines, run_bounded

pytestmark = pytest.mark.integration

T = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def event(i: int, tokens: int, **attrs: object) -> CloudEvent:
    a: dict[str, object] = {
        "id": f"sdk-{i}",
        "source": "svc/sdk",
        "type": "llm.tokens",
        "subject": "acme",
        "time": T + timedelta(seconds=i),
    }
    a.update(attrs)
    return CloudEvent(attributes={k: v for k, v in a.items() if v is not None}, data={"tokens": tokens})


def test_the_official_sdk_in_structured_and_binary_mode_is_rated_alike(small: Settings) -> None:
    s = small
    p = Producer({"bootstrap.servers": s.kafka.brokers})
    ends: dict[int, int] = {}

    def send(msg: ce_kafka.KafkaMessage, drop: str = "") -> None:
        p.produce(s.topics.input, msg.value, b"acme", headers=[(k, v) for k, v in msg.headers.items() if k != drop], partition=0)

    for i in range(5):
        send(ce_kafka.to_structured_event(event(i, 10 + i)))
    for i in range(5, 10):
        send(ce_kafka.to_binary_event(event(i, 10 + i, datacontenttype="application/json")))
    send(ce_kafka.to_binary_event(event(10, 100)), drop="ce_type")  # no ce_type (the SDK refuses to make one): schema
    send(ce_kafka.to_binary_event(event(11, 100, subject="nobody")))  # judged after decoding: unknown tenant
    p.produce(s.topics.input, b"{}", b"acme", headers=[("trace", b"x")], partition=0)  # headers, but no CloudEvent in them
    assert p.flush(30) == 0
    ends = {0: 13}
    stats = run_bounded(s, ends)
    assert stats.accepted == 10 and stats.conservation_gap() == 0
    assert sum(ln.quantity for ln in rated_lines(s)) == sum(10 + i for i in range(10))
    dead = {d.offset: d for d in (msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.config(), s.topics.dlq))}
    assert {o: d.reason for o, d in dead.items()} == {10: "schema", 11: "unknown_tenant", 12: "schema"}
    bad = dead[10]
    assert bad.headers is not None and bad.headers["ce_id"] == "sdk-10" and "ce_type" not in bad.headers
    assert bad.payload == b'{"tokens": 100}' and "type" in bad.message  # the body, as the SDK wrote it
    assert dead[11].tenant_id == "nobody" and dead[11].event_id == "sdk-11"  # readable: tenant and producer seen
