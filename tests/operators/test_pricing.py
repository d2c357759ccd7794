from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from operators.pricing import Rater, price, quantum
from schemas.catalog import Graduated, Package, PerUnit, Tier, Volume

D = Decimal
GRAD = Graduated([Tier(D(100), D("0.10")), Tier(D(1000), D("0.05"), D("2")), Tier(None, D("0.01"))])
VOL = Volume([Tier(D(100), D("0.10")), Tier(None, D("0.05"), D("1"))])


def test_per_unit():
    assert price(PerUnit(D("0.125")), D(8)) == D("1.000")


def test_graduated_charges_each_tier_for_its_band_plus_flat_fee():
    assert price(GRAD, D(50)) == D("5.00")
    assert price(GRAD, D(100)) == D("10.00")
    assert price(GRAD, D(101)) == D("10.00") + D("0.05") + D(2)
    assert price(GRAD, D(2000)) == D("10.00") + D(900) * D("0.05") + D(2) + D(1000) * D("0.01")


def test_volume_prices_whole_quantity_at_the_reached_tier():
    assert price(VOL, D(100)) == D("10.00")
    assert price(VOL, D(101)) == D(101) * D("0.05") + D(1)


def test_package_rounds_up_to_whole_packages():
    p = Package(D(10), D("4.00"))
    assert price(p, D(1)) == D(4)
    assert price(p, D(10)) == D(4)
    assert price(p, D(11)) == D(8)


def test_included_quantity_is_free_and_money_rounds_to_the_currency_unit():
    r = Rater(PerUnit(D("0.333")), D(10), "USD")
    assert r.charge(10) == 0
    assert r.charge(11) == D("0.33")
    assert Rater(PerUnit(D("0.6")), D(0), "JPY").charge(1) == D(1)
    assert quantum("BHD") == D("0.001")


models = st.sampled_from([PerUnit(D("0.0137")), GRAD, VOL, Package(D(7), D("1.99"))])


@given(models, st.lists(st.integers(0, 5000), max_size=40), st.integers(0, 300))
def test_window_amounts_telescope_to_the_price_of_the_total(model, parts, included):
    """However a period is cut into windows, the line amounts add up to its price exactly."""
    r = Rater(model, D(included), "USD")
    cum, total = 0, D(0)
    for q in parts:
        total += r.charge(cum + q) - r.charge(cum)
        cum += q
    assert total == r.charge(cum)
    assert total == Rater(model, D(included), "USD").charge(cum)  # fresh rater: no cache effects
    assert total.as_tuple().exponent >= -2
