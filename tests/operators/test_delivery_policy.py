import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from operators.delivery import Backoff, CircuitBreaker, MicroBatcher, TokenBucket, classify, retry_after


class FakeClock:
    """A manual clock for pure policy objects (not infrastructure)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@given(st.floats(1, 200), st.lists(st.floats(0, 0.05), min_size=1, max_size=300))
def test_token_bucket_never_exceeds_rate_plus_burst(rate, gaps):
    clock = FakeClock()
    bucket = TokenBucket(rate, burst=1, clock=clock)
    sent = []
    for g in gaps:
        clock.t += g
        wait = bucket.reserve()
        clock.t += wait  # the caller sleeps this long before sending
        sent.append(clock.t)
    span = sent[-1] - sent[0]
    assert len(sent) <= 1 + span * rate + 1e-6


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    b = Backoff(base=0.1, cap=2.0, rng=random.Random(1))
    delays = [b.delay(a) for a in range(10)]
    assert all(0 <= d <= min(2.0, 0.1 * 2**a) for a, d in enumerate(delays))
    assert len(set(delays)) == len(delays)


def test_circuit_opens_after_threshold_then_half_opens_to_probe():
    clock = FakeClock()
    cb = CircuitBreaker(threshold=3, reset_after=5, clock=clock)
    for _ in range(2):
        cb.failure()
    assert cb.state == "closed" and cb.wait() == 0
    cb.failure()
    assert cb.state == "open" and cb.wait() == 5
    clock.t += 5
    assert cb.state == "half_open" and cb.wait() == 0
    cb.failure()  # the probe failed: open for another full period
    assert cb.state == "open" and cb.wait() == 5
    clock.t += 5
    cb.success()
    assert cb.state == "closed" and cb.failures == 0


def test_classify_responses():
    assert classify(200) == ("ok", None)
    assert classify(409) == ("ok", None)
    assert classify(None) == ("retry", None)
    assert classify(503) == ("retry", None)
    assert classify(429, {"Retry-After": "3"}) == ("retry", 3.0)
    assert classify(400) == ("reject", None)
    assert classify(422) == ("reject", None)


def test_retry_after_accepts_an_http_date():
    assert retry_after({"retry-after": "Wed, 21 Oct 2026 07:28:10 GMT"}, now=1792567680.0) == 10.0
    assert retry_after({"retry-after": "soon"}) is None


def test_micro_batcher_closes_on_size_or_on_age_of_the_first_item():
    mb: MicroBatcher[int] = MicroBatcher(max_items=3, max_latency=2.0)
    assert mb.add(1, now=10.0) is None
    assert mb.add(2, now=11.5) is None
    assert mb.deadline() == 12.0  # counted from the first item, not the last
    assert mb.due(11.9) is None
    assert mb.due(12.0) == [1, 2]
    assert mb.deadline() is None
    assert mb.add(3, now=20) is None and mb.add(4, now=20) is None
    assert mb.add(5, now=20) == [3, 4, 5]


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "Thu, 01 Jan 2099 00:00:00 GMT", "999999999"])
def test_retry_after_is_capped_however_absurd(value):
    """`inf` used to crash a worker in sleep(); a date in 2099 slept for 70 years."""
    assert retry_after({"Retry-After": value}, now=1792567680.0, cap=60.0) == 60.0


def test_a_negative_retry_after_means_now():
    assert retry_after({"Retry-After": "-5"}, cap=60.0) == 0.0
