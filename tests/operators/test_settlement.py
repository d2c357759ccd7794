"""The emission register's arithmetic alone, without Redis: replays settled by difference."""

from __future__ import annotations

from decimal import Decimal

from operators.settlement import Entry, settle, token
from schemas.outputs import RatedUsageLine
from tests.support.lines import rated_line

D = Decimal
KEY = "acme:calls:2026-03:basic:v1"


def line(qty: int, amount: str, events: int, revision: int = 0) -> RatedUsageLine:
    return rated_line(line_id="engine-id", quantity=qty, amount=amount, event_count=events, revision=revision)


def run(state: dict[str, Entry], hist: dict[str, set[bytes]], *pairs, seed=(), correction=False):
    lines = [p[0] for p in pairs]
    totals = [p[1] for p in pairs]
    return settle(lines, totals, lambda ln: KEY, state, hist, seed=set(seed), correction=correction)


def fresh() -> tuple[dict[str, Entry], dict[str, set[bytes]]]:
    return {KEY: Entry()}, {KEY: set()}


def test_a_first_emission_goes_out_as_it_is_and_becomes_history():
    state, hist = fresh()
    out = run(state, hist, (line(12, "0.20", 12), (D(12), D("0.20"), 12)))
    assert [(ln.quantity, ln.amount, ln.revision) for ln in out.lines] == [(12, D("0.20"), 0)]
    assert state[KEY] == Entry(1, D(12), D("0.20"), 12) and token((D(12), D("0.20"), 12)) in hist[KEY]


def test_a_replay_that_repeats_history_emits_nothing():
    state, hist = fresh()
    history = [(line(5, "0.10", 5), (D(5), D("0.10"), 5)), (line(7, "0.10", 7), (D(12), D("0.20"), 12))]
    assert len(run(state, hist, *history).lines) == 2
    # A replay from a snapshot before both passes through the same states: nothing goes out.
    assert run(state, hist, *history).lines == []
    assert state[KEY] == Entry(2, D(12), D("0.20"), 12)


def test_a_divergent_replay_emits_the_signed_difference_as_a_correction():
    state, hist = fresh()
    run(state, hist, (line(12, "0.20", 12), (D(12), D("0.20"), 12)))
    out = run(state, hist, (line(9, "0.05", 9), (D(9), D("0.05"), 9)))  # the replay saw fewer events
    (c,) = out.lines
    assert (c.quantity, c.amount, c.event_count, c.revision) == (-3, D("-0.15"), -3, 1)
    assert out.reset == {KEY} and hist[KEY] == {token((D(9), D("0.05"), 9))}
    assert c.line_id != "engine-id"


def test_totals_from_before_the_register_existed_are_taken_as_emitted():
    state, hist = fresh()
    out = run(state, hist, (line(2, "0.20", 2), (D(10), D("1.00"), 10)), seed=[KEY])
    assert [(ln.quantity, ln.amount, ln.event_count) for ln in out.lines] == [(2, D("0.20"), 2)]


def test_a_backfill_is_all_corrections_and_ignores_history():
    state, hist = fresh()
    run(state, hist, (line(10, "1.00", 10), (D(10), D("1.00"), 10)))
    out = run(state, hist, (line(10, "1.25", 10), (D(10), D("1.25"), 10)), correction=True)
    (c,) = out.lines
    assert (c.quantity, c.amount, c.revision) == (0, D("0.25"), 1)
