"""Whatever the arrival order, batching, duplicates and idle flushes, the lines of a period
add up to the independent model's quantity and price, and no line_id repeats."""

from datetime import timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from operators.engine_state import EngineConfig
from tests.support.events import CATALOG, Harness, ev
from tests.support.reference import charge

BASIC = CATALOG["plans"][0]

event = st.tuples(
    st.sampled_from(["calls", "tokens"]),
    st.integers(0, 4 * 3600),  # seconds after T0
    st.integers(0, 900),  # tokens
)


@settings(max_examples=120, deadline=None)
@given(
    events=st.lists(event, min_size=1, max_size=80),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(1, 15), min_size=1, max_size=10),
    dup_every=st.integers(2, 9),
    window_s=st.sampled_from([60, 600, 7 * 60]),
)
def test_lines_add_up_to_the_price_of_the_total(events, order, cuts, dup_every, window_s):
    # The dedup horizon covers the whole range: redeliveries beyond it are the Redis
    # backstop's job, not what this property is about.
    h = Harness(EngineConfig(window_ms=window_s * 1000, grace_ms=10**12, dedup_horizon_ms=10**10, idle_timeout_s=5))
    msgs = []
    for i, (meter, sec, tokens) in enumerate(events):
        if meter == "calls":
            msgs.append(ev("acme", "api.request", timedelta(seconds=sec), id=f"p{i}"))
        else:
            msgs.append(ev("acme", "llm.tokens", timedelta(seconds=sec), {"tokens": tokens}, id=f"p{i}"))
    stream = msgs + msgs[::dup_every]  # redeliveries
    order.shuffle(stream)
    now, pos, k = 1000.0, 0, 0
    while pos < len(stream):
        n = cuts[k % len(cuts)]
        h.feed(*stream[pos : pos + n], now=now)
        pos, k = pos + n, k + 1
        if k % 3 == 0:  # a quiet spell: the idle timer closes open windows
            now += 10
            h.lines += h.engine.flush_idle(now).lines
    h.flush()

    calls = sum(1 for m, _, _ in events if m == "calls")
    tokens = sum(t for m, _, t in events if m == "tokens")
    got_q = {"calls": Decimal(0), "tokens": Decimal(0)}
    got_a = {"calls": Decimal(0), "tokens": Decimal(0)}
    for ln in h.lines:
        got_q[ln.meter] += ln.quantity
        got_a[ln.meter] += ln.amount
    assert got_q == {"calls": calls, "tokens": tokens}
    assert got_a == {"calls": charge(BASIC, "calls", Decimal(calls)), "tokens": charge(BASIC, "tokens", Decimal(tokens))}
    assert len({ln.line_id for ln in h.lines}) == len(h.lines)
    assert h.stats.duplicates == len(msgs[::dup_every]) and h.stats.conservation_gap() == 0
