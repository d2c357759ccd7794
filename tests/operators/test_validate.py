"""Every failure becomes a dead letter with a reason; any byte string is handled."""

from datetime import UTC, datetime

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.deadletters import dead_letter, encode_fitted
from operators.validate import Validator
from schemas.events import InputLimits
from schemas.outputs import DeadLetter
from tests.support.events import Harness, Msg, ev


def reasons(h: Harness) -> list[str]:
    return [d.reason for d in h.dead]


@pytest.mark.parametrize(
    ("value", "reason", "fragment"),
    [
        (b"{not json", "invalid_json", "not JSON"),
        (b"", "invalid_json", "empty message"),
        (b'"a string"', "schema", "Expected"),
        (b"[]", "schema", "empty JSON array"),
        (b"[0", "invalid_json", "truncated"),
        (
            orjson.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": "api.request", "time": "2026-03-10T12:00:00Z"}),
            "schema",
            "subject",
        ),
        (
            orjson.dumps(
                {"specversion": "0.3", "id": "1", "source": "s", "type": "api.request", "subject": "acme", "time": "2026-03-10T12:00:00Z"}
            ),
            "schema",
            "specversion",
        ),
        (
            orjson.dumps(
                {"specversion": "1.0", "id": "1", "source": "s", "type": "api.request", "subject": "acme", "time": "2026-03-10T12:00:00"}
            ),
            "schema",
            "timezone",
        ),
        (ev("nobody"), "unknown_tenant", "not in the catalog"),
        (
            ev("late-co", at=datetime(2026, 2, 1, tzinfo=UTC)),
            "unknown_tenant",
            "no contract in force",
        ),
        (ev(etype="video.minutes"), "unknown_meter", "video.minutes"),
        (ev(etype="llm.tokens", data={"tokens": -3}), "bad_quantity", "data.tokens"),
        (ev(etype="llm.tokens", data={"tokens": "lots"}), "bad_quantity", "data.tokens"),
        (ev(etype="llm.tokens", data={"tokens": None}), "bad_quantity", "data.tokens"),
        (ev(etype="llm.tokens", data={"other": 1}), "bad_quantity", "tokens"),
        (ev(etype="llm.tokens"), "bad_quantity", "data"),
        (ev(etype="llm.tokens", data={"tokens": "-1.5"}), "bad_quantity", "non-negative"),
        (ev(etype="storage.snapshot", data={"usage": 5}), "bad_quantity", "data.usage"),
        (ev(etype="user.active", data={"user_id": [1]}), "bad_quantity", "data.user_id"),
    ],
)
def test_each_failure_has_its_reason_and_keeps_the_original_bytes(value, reason, fragment):
    h = Harness()
    h.feed(value)
    assert reasons(h) == [reason]
    d = h.dead[0]
    assert fragment in d.message
    assert d.payload == value
    assert (d.topic, d.partition, d.offset) == ("usage.events", 0, 0)
    assert h.stats.conservation_gap() == 0


def test_decimal_quantities_stay_exact():
    h = Harness()
    acc = h.accept(ev(etype="llm.tokens", data={"tokens": 0.1}), ev(etype="storage.snapshot", data={"usage": {"gb": "2.675"}}))
    assert [str(a.values[0][1]) for a in acc] == ["0.1", "2.675"]


def test_array_message_counts_each_event_and_a_bad_element_does_not_sink_its_neighbours():
    good1 = orjson.loads(ev(at=__import__("datetime").timedelta(seconds=1)))
    good2 = orjson.loads(ev(at=__import__("datetime").timedelta(seconds=2)))
    bad = {**good1, "id": "bad", "subject": None}
    h = Harness()
    h.feed(orjson.dumps([good1, bad, good2]))
    assert h.stats.accepted == 2
    assert reasons(h) == ["schema"]
    assert h.dead[0].index == 1
    assert h.stats.records_in == 3 and h.stats.conservation_gap() == 0


@pytest.mark.parametrize("depth", [33, 40, 5_000])
def test_a_deep_element_is_judged_alone_and_does_not_sink_its_array(depth):
    """Issue 18: `[good, <nested deeper than the limit>, good]` was one `too_deep` record and
    0 accepted. The bound is per event: 2 accepted, 1 dead letter with its index and tenant."""
    good1 = orjson.loads(ev(at=__import__("datetime").timedelta(seconds=1)))
    good2 = orjson.loads(ev(at=__import__("datetime").timedelta(seconds=2)))
    deep_value: object = 1
    for _ in range(depth):
        deep_value = [deep_value]
    deep = {**good1, "id": "deep", "data": {"extra": deep_value}}
    h = Harness()
    deep_raw = orjson.dumps(deep) if depth < 500 else _deep_element(depth)
    h.feed(b"[" + orjson.dumps(good1) + b"," + deep_raw + b"," + orjson.dumps(good2) + b"]")
    assert h.stats.accepted == 2
    assert reasons(h) == ["too_deep"] and h.dead[0].index == 1 and "TALLYFLOW_MAX_DEPTH" in h.dead[0].message
    assert h.stats.records_in == 3 and h.stats.conservation_gap() == 0


def _deep_element(depth: int) -> bytes:
    """An event whose data nests `depth` arrays (deeper than orjson will write)."""
    head = orjson.dumps(orjson.loads(ev(id="deep")))[:-1]
    return head + b',"extra":' + b"[" * depth + b"1" + b"]" * depth + b"}"


def test_the_depth_bound_is_per_element_of_an_array():
    """An element exactly at the limit is accepted although the array around it is one deeper."""
    h = _limited(max_depth=3)
    at_limit = orjson.loads(ev(etype="storage.snapshot", data={"usage": {"gb": 2}}))  # 3 deep alone
    h.feed(orjson.dumps([at_limit, at_limit | {"id": "other"}]))
    assert h.stats.accepted == 2 and not h.dead


def test_unknown_fields_and_extra_data_are_ignored():
    body = orjson.loads(ev(etype="llm.tokens", data={"tokens": 4, "model": {"deep": [1, 2]}}))
    body["datacontenttype"] = "application/json"
    h = Harness()
    assert len(h.accept(orjson.dumps(body))) == 1


valid = st.sampled_from([ev(), ev(etype="llm.tokens", data={"tokens": 3}), ev(etype="user.active", data={"user_id": "u"})])


def _mutate(data: bytes, cut: int, junk: bytes) -> bytes:
    return data[: cut % (len(data) + 1)] + junk + data[cut % (len(data) + 1) :]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.binary(max_size=200), st.builds(_mutate, valid, st.integers(0, 300), st.binary(max_size=5)), valid), max_size=20)
)
def test_any_byte_string_ends_accepted_or_dead_never_raises(values):
    h = Harness()
    h.feed(*values)
    s = h.stats
    assert s.records_in >= len(values)
    assert s.conservation_gap() == 0


def _limited(**kw):
    h = Harness()
    h.validator = h.engine.judge = Validator(h.index, h.stats, InputLimits(**kw))
    return h


@pytest.mark.parametrize(
    ("limits", "value", "reason", "setting"),
    [
        ({"max_message_bytes": 100}, ev(data=None), "too_large", "TALLYFLOW_MAX_MESSAGE_BYTES"),
        ({"max_depth": 2}, ev(etype="storage.snapshot", data={"usage": {"gb": {"x": [1]}}}), "too_deep", "TALLYFLOW_MAX_DEPTH"),
        ({"max_id_length": 4}, ev(id="12345"), "schema", "$.id"),
        ({"max_source_length": 2}, ev(source="svc"), "schema", "$.source"),
        ({"max_subject_length": 3}, ev("acme"), "schema", "$.subject"),
        ({"max_value_length": 3}, ev(etype="user.active", data={"user_id": "u-1234"}), "bad_quantity", "user_id"),
        ({"max_quantity": 100}, ev(etype="llm.tokens", data={"tokens": 101}), "bad_quantity", "data.tokens"),
        ({"max_quantity": 100}, ev(etype="llm.tokens", data={"tokens": "100.5"}), "bad_quantity", "TALLYFLOW_MAX_QUANTITY"),
        ({"max_quantity_decimals": 2}, ev(etype="llm.tokens", data={"tokens": "1.125"}), "bad_quantity", "DECIMALS"),
        ({}, ev(at=datetime(1999, 12, 31, tzinfo=UTC)), "bad_time", "2000-01-01"),
        ({}, ev(at=datetime(2026, 11, 30, 0, 6, tzinfo=UTC)), "future_time", "FUTURE"),
    ],
)
def test_every_bound_is_a_setting_named_in_its_dead_letter(limits, value, reason, setting):
    h = _limited(**limits)
    h.feed(value)
    assert reasons(h) == [reason], h.dead[0].message
    assert setting in h.dead[0].message
    assert h.stats.conservation_gap() == 0 and not h.engine.tenants


def test_trailing_zeros_are_not_extra_decimals_and_the_limit_is_inclusive():
    h = _limited(max_quantity=100, max_quantity_decimals=2)
    h.feed(ev(etype="llm.tokens", data={"tokens": "99.50000000"}), ev(etype="llm.tokens", data={"tokens": 100}))
    assert not h.dead and h.stats.accepted == 2


def test_the_future_is_measured_from_the_message_timestamp_when_earlier_than_the_clock():
    """A replay of the same message judges it as the first reading did."""
    h = Harness()
    t = datetime(2026, 11, 1, 12, tzinfo=UTC)
    produced_ms = int(datetime(2026, 11, 1, 11, 50, tzinfo=UTC).timestamp() * 1000)
    acc = []
    h.validator.parse_batch([Msg(ev(at=t), 0, produced_ms)], "usage.events", 0, "now", acc, h.dead, h.now_ms)
    assert reasons(h) == ["future_time"] and not acc


def test_dead_letters_carry_the_tenant_and_event_id_when_the_envelope_was_readable():
    h = Harness()
    h.feed(ev("acme", "llm.tokens", id="e-77", data={"tokens": "lots"}))
    d = h.dead[0]
    assert (d.reason, d.tenant_id, d.event_id) == ("bad_quantity", "acme", "e-77")
    assert d.payload_bytes == len(d.payload) and len(d.payload_sha256) == 64


def test_dead_letters_fit_any_output_limit():
    d = dead_letter("invalid_json", "x" * 50_000, b"\xff" * 900_000, "t", 0, 1, "now", tenant_id="y" * 100_000)
    for cap in (1_000_000, 200_000, 5_000):
        out = encode_fitted(d, cap)
        assert len(out) <= cap
        back = msgspec.json.decode(out, type=DeadLetter)
        assert back.payload_bytes == 900_000 and back.payload == b"\xff" * len(back.payload)
        assert len(back.message) < 2000 and len(back.tenant_id) < 1000


def _binary(**headers: bytes) -> list[tuple[str, bytes]]:
    base = {"ce_specversion": b"1.0", "ce_id": b"b-1", "ce_source": b"svc", "ce_type": b"llm.tokens", "ce_subject": b"acme"}
    base["ce_time"] = b"2026-03-10T12:00:00Z"
    base.update(headers)
    return [(k, v) for k, v in base.items() if v]


def test_a_binary_mode_event_is_judged_as_its_structured_equivalent():
    h = Harness()
    msgs = [
        Msg(b'{"tokens": 7}', 0, 0, _binary(**{"content-type": b"application/json"})),
        Msg(b'{"tokens": 8}', 1, 0, _binary(ce_id=b"b-2")),  # no content type: JSON is assumed
        Msg(b"seven", 2, 0, _binary(ce_id=b"b-3", **{"content-type": b"text/plain"})),
        Msg(b'{"tokens": 9}', 3, 0, _binary(ce_id=b"b-4", ce_subject=b"\xff")),
        Msg(b'{"tokens": 9}', 4, 0, _binary(ce_id=b"b-5", ce_time=b"")),
    ]
    groups, dead = h.validator.route(msgs, "usage.events", 0, "now", h.now_ms, lambda _: "")
    h.engine.process(groups[""], "usage.events", 0, 1000.0, "now")
    assert h.stats.accepted == 2
    assert [(d.offset, d.reason) for d in dead] == [(2, "schema"), (3, "invalid_json"), (4, "schema")]
    assert "application/json" in dead[0].message and dead[0].payload == b"seven" and dead[0].headers["content-type"] == "text/plain"
    assert dead[2].headers is not None and "ce_time" not in dead[2].headers and "time" in dead[2].message
    assert h.stats.conservation_gap() == 0
