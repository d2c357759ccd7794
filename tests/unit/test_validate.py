"""Every failure becomes a dead letter with a reason; any byte string is handled."""

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Harness, ev


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
            ev("late-co", at=__import__("datetime").datetime(2026, 2, 1, tzinfo=__import__("datetime").UTC)),
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
