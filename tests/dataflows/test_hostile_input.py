"""Hostile input against the real broker: the rating dataflow stays up, every neighbour is
rated exactly, each poison message becomes one dead letter with its reason, outputs fit a
lowered message.max.bytes, and a quiet partition still finishes in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import orjson
import pytest
from bytewax._bytewax import cli_main
from confluent_kafka import Producer

from dataflows.rating import Bounds, build_flow
from devkit.pipeline import wait_until
from operators.stats import Stats
from runtime.kafka import read_topic
from runtime.settings import Settings, to_env
from schemas.outputs import DeadLetter, RatedUsageLine

NOW = datetime.now(UTC).replace(microsecond=0)
TENANTS = ["t-0001", "t-0002", "t-0003", "t-0004"]


def event(i: int, tenant: str, *, at: datetime | None = None, tokens: object = 10, **kw: object) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"ok-{i}",
        "source": "svc/llm",
        "type": "llm.tokens",
        "subject": tenant,
        "time": (at or NOW - timedelta(minutes=30) + timedelta(seconds=i % 600)).isoformat().replace("+00:00", "Z"),
        "data": {"tokens": tokens},
        **kw,
    }


def poison() -> list[tuple[str, bytes]]:
    """(expected reason, message) for each class of the issue's reproductions."""
    ok = orjson.dumps(event(9000, "t-0001"))
    future = orjson.dumps(event(9001, "t-0002", at=NOW + timedelta(days=365)))
    return [
        ("too_deep", b"[" * 996 + b"]" * 996),
        ("bad_quantity", ok.replace(b'"tokens":10', b'"tokens":1e31')),
        ("bad_quantity", ok.replace(b'"tokens":10', b'"tokens":' + b"9" * 40)),
        ("bad_quantity", ok.replace(b'"tokens":10', b'"tokens":1E999999999')),
        ("bad_quantity", ok.replace(b'"tokens":10', b'"tokens":100.000000000000000000000000000001')),
        ("future_time", ok.replace(NOW.strftime("%Y").encode(), b"9999", 1)),
        ("future_time", future),
        ("invalid_json", b"\x00" * 750_000),
        ("schema", orjson.dumps(event(9002, "x" * 300_000))),
        ("too_large", orjson.dumps(event(9003, "t-0003", id="i" * 2_000_000))),
    ]


def produce(s: Settings, messages: list[bytes]) -> dict[int, int]:
    p = Producer({"bootstrap.servers": s.kafka.brokers, "message.max.bytes": 5_000_000})
    ends: dict[int, int] = {}
    for m in messages:
        p.produce(s.topics.input, m, partition=0, on_delivery=lambda err, msg: ends.__setitem__(msg.partition(), msg.offset() + 1))
    assert p.flush(30) == 0
    return ends


def test_one_message_of_each_poison_class_among_valid_events_is_one_dead_letter_each(settings: Settings):
    # Outputs must fit a producer limit far below the poison's size.
    s = settings.replace(kafka={"message.max.bytes": "200000"})
    valid = [orjson.dumps(event(i, TENANTS[i % 4], tokens=i + 1)) for i in range(200)]
    array = orjson.dumps([event(500, "t-0001", tokens=7), event(501, "t-0002", tokens=8), event(502, "t-0003", tokens=9)])
    bad_utf8 = array.replace(b'"ok-501"', b'"ok-\xff501"')
    surrogate = array.replace(b'"ok-501"', b'"ok-\\ud800"').replace(b"ok-500", b"ok-600").replace(b"ok-502", b"ok-602")
    cases = poison()
    messages = valid[:100] + [m for _, m in cases] + [bad_utf8, surrogate] + valid[100:]
    stats = Stats()
    cli_main(build_flow(s, bounds=Bounds(produce(s, messages)), stats=stats))  # returns: the flow stayed up to the end

    dead = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.config(), s.topics.dlq)]
    by_offset = {(d.offset, d.index): d for d in dead}
    for k, (reason, raw) in enumerate(cases, start=100):
        # The deep poison is an array: its one element is judged (and too deep) alone, index 0.
        d = by_offset[(k, 0 if k == 100 else None)]
        raw = raw[1:-1] if k == 100 else raw  # an element's dead letter keeps the element
        assert d.reason == reason, (k, d.reason, d.message)
        assert d.payload_bytes == len(raw) and d.payload == raw[: len(d.payload)]
    assert len(by_offset[(100 + 7, None)].payload) < 200_000 < 750_000  # cut to fit, with length and hash kept
    # In the arrays, only the broken element is dead; its two neighbours count.
    arrays = [d for d in dead if d.index is not None and d.offset != 100]
    assert [(d.reason, d.index) for d in arrays] == [("invalid_json", 1), ("invalid_json", 1)]
    assert Counter(d.reason for d in dead) == Counter([r for r, _ in cases] + ["invalid_json", "invalid_json"])

    lines = [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.config(), s.topics.rated)]
    qty: Counter[str] = Counter()
    for ln in lines:
        qty[ln.tenant_id] += int(ln.quantity)
    want: Counter[str] = Counter()
    for i in range(200):
        want[TENANTS[i % 4]] += i + 1
    want.update({"t-0001": 7 + 7, "t-0003": 9 + 9})
    assert qty == want
    assert sum(ln.amount for ln in lines) >= Decimal(0)
    assert stats.conservation_gap() == 0 and stats.records_in == 200 + len(cases) + 6
    assert stats.dead["internal_error"] == 0


def test_a_future_dated_event_does_not_poison_its_tenant(settings: Settings):
    """One event dated next year used to move the tenant's watermark: its current events then
    became too_late. Now it is a future_time dead letter and moves nothing."""
    messages = [orjson.dumps(event(1, "t-0001", at=NOW + timedelta(days=365)))]
    messages += [orjson.dumps(event(i, "t-0001", at=NOW - timedelta(hours=2) + timedelta(seconds=i))) for i in range(2, 102)]
    stats = Stats()
    cli_main(build_flow(settings, bounds=Bounds(produce(settings, messages)), stats=stats))
    assert dict(stats.dead) == {"future_time": 1} and stats.accepted == 100


@pytest.mark.timeout(120)
def test_a_quiet_partition_still_finishes_within_the_idle_timeout(settings: Settings, stack, tmp_path):
    """One burst (one event per tenant, some invalid), then silence: every line and every dead
    letter is on its topic within the idle timeout plus one check interval; SIGTERM then
    stops the process cleanly."""
    idle = 2.0
    env = {
        **os.environ,
        **to_env(settings),
        "TALLYFLOW_IDLE_TIMEOUT_SECONDS": str(idle),
        "TALLYFLOW_DEDUP_STORE_DAYS": "0",
        "TALLYFLOW_LOG_FORMAT": "text",
    }
    log = (tmp_path / "rate.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "bytewax.run", "dataflows.rating:get_flow()"], env=env, stdout=log, stderr=log)
    try:
        # Wait until the flow reads its input (a first event rated), then the burst.
        produce(settings, [orjson.dumps(event(0, "t-0100", tokens=1))])
        wait_until(lambda: read_topic(settings.kafka.config(), settings.topics.rated), 60, "the flow to rate its first event")
        burst = [orjson.dumps(event(i, f"t-{i:04d}", tokens=i)) for i in range(1, 21)]
        burst += [b"{broken", orjson.dumps(event(99, "nobody"))]
        produce(settings, burst)
        sent = time.monotonic()

        def done() -> bool:
            rated = {
                msgspec.json.decode(v, type=RatedUsageLine).tenant_id for v in read_topic(settings.kafka.config(), settings.topics.rated)
            }
            return len(read_topic(settings.kafka.config(), settings.topics.dlq)) == 2 and rated >= {f"t-{i:04d}" for i in range(1, 21)}

        wait_until(done, 30, "every line and dead letter of the burst")
        took = time.monotonic() - sent
        assert took <= idle + 2.0, f"{took:.1f}s after the burst"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        text = (tmp_path / "rate.log").read_text()
        assert "panicked" not in text and "Traceback" not in text
        assert "SIGTERM received: stopping" in text
    finally:
        if proc.poll() is None:
            proc.kill()
