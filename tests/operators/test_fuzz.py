"""Seeded fuzzing of the validator and the engine together: 200,000 mutated messages, in
process, each judged (accepted or a dead letter), none escaping as an exception, with the
conservation counters exact. `make fuzz` runs the coverage-guided variant (atheris)."""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import timedelta

import orjson
import pytest

from operators.deadletters import encode_fitted
from schemas.outputs import ENCODER
from tests.support.events import Harness, ev

MESSAGES = 200_000
BATCH = 500


def seeds() -> list[bytes]:
    """Valid events of every meter type and shape, an array, and hostile classics."""
    good = [
        ev("acme", "api.request"),
        ev("bolt", "llm.tokens", data={"tokens": 1234}),
        ev("acme", "llm.tokens", data={"tokens": "12.5"}),
        ev("acme", "storage.snapshot", data={"usage": {"gb": 3.25}}),
        ev("late-co", "user.active", data={"user_id": "u-7"}),
        ev("acme", "seats.updated", at=timedelta(days=2), data={"seats": 12}),
        ev("bolt", "api.request", at=timedelta(days=12)),
    ]
    hostile = [
        b"[" * 40 + b"]" * 40,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        ev(etype="llm.tokens", data={"tokens": 1}).replace(b'"tokens":1', b'"tokens":1E999999999'),
        ev(etype="llm.tokens", data={"tokens": 1}).replace(b'"tokens":1', b'"tokens":' + b"9" * 40),
        ev().replace(b"2026-03-10T12:00:00Z", b"9999-12-31T23:59:59.999999Z"),
        ev().replace(b'"svc"', b'"s\\ud800vc"'),
        b"",
        b"null",
        b"[]",
    ]
    return [*good, b"[" + b",".join(good[:3]) + b"]", *hostile]


TOKENS = [
    b"1e31",
    b"-0",
    b'"NaN"',
    b'"Infinity"',
    b"1E-30",
    b"null",
    b"[]",
    b"{}",
    b'"\\ud800"',
    b"\xff",
    b'"9999-12-31T23:59:59Z"',
    b'"0001-01-01T00:00:00Z"',
    b"[" * 50,
    b'"' + b"x" * 300 + b'"',
    b"18446744073709551616",
    b"0.1234567891",
]


def mutate(rng: random.Random, msg: bytes, corpus: list[bytes]) -> bytes:
    b = bytearray(msg)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0 and b:  # flip a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:  # truncate
            del b[rng.randrange(len(b)) :]
        elif op == 2:  # insert a hostile token
            i = rng.randint(0, len(b))
            b[i:i] = rng.choice(TOKENS)
        elif op == 3 and b:  # replace a JSON value after a colon
            i = b.find(b":", rng.randrange(len(b)))
            if i >= 0:
                j = i + 1
                while j < len(b) and b[j] not in b",}":
                    j += 1
                b[i + 1 : j] = rng.choice(TOKENS)
        elif op == 4:  # splice two messages
            other = rng.choice(corpus)
            b = b[: rng.randint(0, len(b))] + bytearray(other[rng.randint(0, len(other)) :])
        elif op == 5:  # wrap in an array with neighbours
            b = bytearray(b"[" + bytes(b) + b"," + rng.choice(corpus) + b"]")
        elif b:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randint(1, 40)]
    return bytes(b)


def test_mutated_messages_are_each_judged_and_none_escapes():
    rng = random.Random(20261130)
    corpus = seeds()
    h = Harness()
    t0 = time.perf_counter()
    judged: set[int] = set()
    for start in range(0, MESSAGES, BATCH):
        batch = []
        for i in range(start, start + BATCH):
            msg = rng.choice(corpus).replace(b'"id":"e', b'"id":"m%d_' % i)  # fresh ids; some copies stay duplicates
            batch.append(mutate(rng, msg, corpus) if rng.random() < 0.7 else msg)
        first = h.offset
        n_dead = len(h.dead)
        items = h.route(*batch)
        judged |= {it[2] for it in items} | {d.offset for d in h.dead[n_dead:]}
        assert judged >= set(range(first, first + BATCH)), "a message left no outcome"
        out = h.engine.process(items, "usage.events", 0, 1000.0 + start, "now")
        h.dead += out.dead
        for a in out.alerts:
            assert len(ENCODER.encode(a)) < 4096
    h.flush()
    seconds = time.perf_counter() - t0
    s = h.stats
    reasons = Counter(d.reason for d in h.dead)
    print(f"\nfuzz: {MESSAGES:,} messages, {s.records_in:,} records in {seconds:.1f}s: {s.accepted:,} accepted, {dict(reasons)}")
    assert s.conservation_gap() == 0
    assert s.records_in >= MESSAGES
    assert reasons["internal_error"] == 0, [d.message for d in h.dead if d.reason == "internal_error"][:3]
    assert s.accepted > 10_000 and len(reasons) >= 8, "the mutations stopped reaching the deeper checks"
    for d in h.dead[::97]:
        assert len(encode_fitted(d, 10_000)) <= 10_000
    assert seconds < 60


def test_a_bug_on_one_event_dead_letters_it_alone(monkeypatch):
    """A failure of ours (simulated) in the engine spares the event's neighbours."""
    h = Harness()
    events = [ev("acme", "llm.tokens", at=timedelta(minutes=m), data={"tokens": n}) for m, n in ((0, 1), (5, 2), (6, 3))]
    real = h.engine._slot
    bad_ws = h.accept(events[1])[0].ts_ms // 60_000 * 60_000
    h.stats.records_in -= 1  # accept() above was only to learn the window

    def flaky(t, pmi, period, pv, ws, cell=None):
        if ws == bad_ws:
            raise ZeroDivisionError("simulated bug")
        return real(t, pmi, period, pv, ws, cell)

    monkeypatch.setattr(h.engine, "_slot", flaky)
    h.feed(*events)
    h.flush()
    assert [d.reason for d in h.dead] == ["internal_error"]
    assert "simulated bug" in h.dead[0].message and h.dead[0].tenant_id == "acme"
    assert sum(ln.quantity for ln in h.lines) == 1 + 3
    assert h.stats.conservation_gap() == 0


@pytest.mark.parametrize("path", ["engine", "parse_batch"])
def test_a_bug_in_validation_dead_letters_that_message_alone(monkeypatch, path):
    """In the engine's pass (the dataflow) and when judging at once (the HTTP ingest)."""
    h = Harness()
    values = [ev("acme"), ev("bolt"), ev("acme")]
    real = h.validator.judge

    def flaky(e, max_ms):
        if e.subject == "bolt":
            raise KeyError("simulated bug")
        return real(e, max_ms)

    monkeypatch.setattr(h.validator, "judge", flaky)
    if path == "engine":
        h.feed(*values)
        assert h.stats.accepted == 2 and h.stats.conservation_gap() == 0
    else:
        assert [a.tenant_id for a in h.accept(*values)] == ["acme", "acme"]
    assert [d.reason for d in h.dead] == ["internal_error"] and h.dead[0].offset == 1 and "simulated bug" in h.dead[0].message
    assert h.stats.records_in == 3


def test_orjson_arrays_of_valid_events_count_each_element():
    h = Harness()
    h.feed(orjson.dumps([orjson.loads(ev("acme")), orjson.loads(ev("bolt"))]))
    assert h.stats.accepted == 2 and h.stats.records_in == 2
