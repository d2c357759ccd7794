"""AVG and MIN (SPEC §9.3): exact, mergeable window by window, and lowered by a late value."""

import itertools
import pickle
from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from operators.aggregate import AGGREGATIONS, AvgAgg, MinAgg

D = Decimal


def avg(*values):
    a = AvgAgg()
    for v in values:
        a.add(v, 0)
    return a


def mn(*values):
    a = MinAgg()
    for v in values:
        a.add(v, 0)
    return a


def test_both_are_registered_by_their_catalog_names():
    assert isinstance(AGGREGATIONS["AVG"](), AvgAgg)
    assert isinstance(AGGREGATIONS["MIN"](), MinAgg)


def test_avg_is_sum_over_count_to_nine_places_half_up():
    assert avg().value() == 0 and isinstance(avg().value(), Decimal)
    assert avg(1, 2, 2).value() == D("1.666666667")
    assert avg(10, 20).value() == D(15) and avg(10, 20).value().as_tuple().exponent == -9
    assert avg(D("0.5"), 1).value() == D("0.75")
    # Exactly half a unit of the 9th place rounds up (HALF_EVEN would give ...000 and ...002).
    assert avg(D("0.000000001"), 0).value() == D("0.000000001")
    assert avg(D("0.000000005"), 0).value() == D("0.000000003")
    assert avg(2, 2, 3).value() == D("2.333333333")  # below half: down


def test_avg_merges_sums_and_counts_not_means():
    a, b = avg(1, 1, 1), avg(5)
    a.merge(b)
    assert (a.s, a.n) == (8, 4) and a.value() == D(2)  # the mean of means would be 3
    e = avg()
    a.merge(e)
    assert a.value() == D(2)


def test_a_late_value_lowers_avg_and_min():
    a, m = avg(10, 20), mn(10, 20)
    late_a, late_m = avg(3), mn(3)
    a.merge(late_a)
    m.merge(late_m)
    assert a.value() == D(11) and m.value() == 3


def test_min_is_the_smallest_value_and_zero_only_when_empty_or_added():
    assert mn().value() == 0
    assert mn(5, 3, 7).value() == 3
    assert mn(D("2.5"), 3).value() == D("2.5")
    assert mn(4, 0, 2).value() == 0
    m = mn(5)
    m.merge(MinAgg())  # an empty window must not pull the minimum to 0
    assert m.value() == 5
    e = MinAgg()
    e.merge(mn(8))
    assert e.value() == 8
    m.merge(mn(9))
    assert m.value() == 5


def test_they_survive_a_snapshot():
    a, m = pickle.loads(pickle.dumps((avg(1, 2), mn(4, 2))))
    assert (a.value(), m.value()) == (D("1.5"), 2)
    assert pickle.loads(pickle.dumps(MinAgg())).value() == 0


values = st.lists(st.integers(0, 10**6) | st.decimals(0, 10**6, places=9).map(D), min_size=1, max_size=30)


@given(values, st.lists(st.integers(0, 30), max_size=5))
def test_windows_merge_to_the_period_whatever_the_split(vals, cuts):
    """Cut the period's values into windows: merged, they give what one pass gives, and
    AVG is the exact mean rounded once."""
    bounds = sorted({0, len(vals), *(c % (len(vals) + 1) for c in cuts)})
    period_a, period_m = AvgAgg(), MinAgg()
    for lo, hi in itertools.pairwise(bounds):
        period_a.merge(avg(*vals[lo:hi]))
        period_m.merge(mn(*vals[lo:hi]))
    assert period_a.value() == avg(*vals).value()
    assert period_m.value() == min(vals)
    exact = sum(Fraction(v) for v in vals) / len(vals) * 10**9
    whole = int(exact)
    assert period_a.value() == D(whole + (exact - whole >= Fraction(1, 2))).scaleb(-9)
