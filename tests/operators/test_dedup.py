from hypothesis import given
from hypothesis import strategies as st

from operators.dedup import GenerationalDedup, event_hash, meta, position

H = 60_000


def test_duplicate_within_horizon_is_seen_and_first_sighting_is_not():
    d = GenerationalDedup(H)
    assert not d.seen(7)
    assert d.seen(7)


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10 * H)), max_size=300))
def test_never_forgets_an_id_before_the_watermark_moves_a_full_horizon(items):
    d = GenerationalDedup(H)
    first_wm: dict[int, int] = {}
    wm = 0
    for key, step in items:
        wm += step // 50
        dup = d.seen(key)
        if key in first_wm and wm - first_wm[key] < H:
            assert dup, "a duplicate inside the horizon was accepted"
        if not dup:
            first_wm[key] = wm
        d.advance(wm)


def test_memory_is_bounded_by_two_horizons_and_evictions_carry_the_log():
    d = GenerationalDedup(H)
    evicted: list[int] = []
    for i in range(100_000):
        wm = i * 100  # 600 ids per horizon
        d.seen(i, meta(position(0, i, None), wm))
        gone = d.advance(wm)
        if gone is not None:
            ids, log = gone
            assert sorted(ids) == sorted(log[0::2]) and len(log) == 2 * len(ids)
            evicted += ids
    assert len(d) <= 2 * (H // 100) + 1
    # Every id is either still in memory or was handed over, once.
    assert sorted(evicted + sorted(d.cur | d.prev)) == list(range(100_000))


def test_hashes_are_stable_and_positions_tell_a_reread_from_a_copy():
    assert event_hash("acme", "svc", "e-1") == event_hash("acme", "svc", "e-1") != event_hash("bolt", "svc", "e-1")
    assert 0 <= event_hash("acme", "svc", "e-1") < 2**64
    assert position(0, 10, None) != position(0, 11, None) != position(1, 10, None)
    assert position(0, 10, 3) != position(0, 10, 4)
    assert position(2, 2**40, None) == position(2, 2**40, None) and 0 <= position(3, 2**40 + 7, 9) < 2**32


def test_the_validator_computes_the_same_keys_as_the_dedup_module():
    """The validator inlines event_hash, position and meta for speed: they must agree."""
    from tests.support.events import Harness, ev

    h = Harness()
    h.offset = 12_345
    (a,) = h.accept(ev("acme", id="e-1", source="svc"))
    assert a.h == event_hash("acme", "svc", "e-1")
    assert a.m == meta(position(0, 12_345, None), a.ts_ms)
