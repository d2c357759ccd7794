from hypothesis import given
from hypothesis import strategies as st

from operators.dedup import GenerationalDedup

H = 60_000


def test_duplicate_within_horizon_is_seen_and_first_sighting_is_not():
    d = GenerationalDedup(H)
    assert not d.seen("a")
    assert d.seen("a")


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10 * H)), max_size=300))
def test_never_forgets_an_id_before_the_watermark_moves_a_full_horizon(items):
    d = GenerationalDedup(H)
    first_wm: dict[int, int] = {}
    wm = 0
    for key, step in items:
        wm += step // 50
        dup = d.seen(str(key))
        if key in first_wm and wm - first_wm[key] < H:
            assert dup, "a duplicate inside the horizon was accepted"
        if not dup:
            first_wm[key] = wm
        d.advance(wm)


def test_memory_is_bounded_by_two_horizons():
    d = GenerationalDedup(H)
    for i in range(100_000):
        wm = i * 100  # 600 ids per horizon
        d.seen(f"id-{i}")
        d.advance(wm)
    assert len(d) <= 2 * (H // 100) + 1
