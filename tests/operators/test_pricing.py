import itertools
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from operators.aggregate import AvgAgg, MinAgg
from operators.pricing import FeeRater, Rater, cell_price, fee, price, quantum
from schemas.catalog import Cell, Graduated, Matrix, Package, Percentage, PerUnit, Tier, Volume, parse_catalog
from tests.support.events import ev
from tests.support.reference import expected

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


# -- Contracts (SPEC §9): percentage fees, matrix cells ---------------------------------
CARD = Percentage(D("0.029"), D("0.30"), D("0.50"), D("10"))


def test_fee_is_value_times_rate_plus_fixed_fee_clamped_and_never_rounded():
    assert fee(CARD, 100) == D("3.200")  # 100 x 0.029 + 0.30
    assert fee(CARD, 7) == D("0.503")  # exact: not rounded to the cent
    assert fee(CARD, D("7.00")) == D("0.50300")
    assert fee(CARD, 6) == D("0.50")  # 0.474 raised to the minimum
    assert fee(CARD, 0) == D("0.50")
    assert fee(Percentage(D("0.029"), D("0.30")), 5) == D("0.445")  # no minimum
    assert fee(CARD, 1000) == D("10")  # 29.30 clamped to the maximum
    assert fee(CARD, D("334.4827586206896551724137931")) == D("9.9999999999999999999999999999")  # just under: kept exact
    assert fee(Percentage(D("0.01")), D("12.34")) == D("0.1234")  # no fixed fee, no clamps
    assert fee(Percentage(D("0.01"), D("0.25"), max_fee=D("0.20")), 1) == D("0.20")  # max beats fixed fee
    assert fee(Percentage(D(0), D("0.25")), 10**15) == D("0.25")


def test_fee_is_exact_whatever_the_thread_context():
    value, rate = D("999999999999999.999999999"), D("0.000000000001")
    with localcontext() as ctx:
        ctx.prec = 5
        f = fee(Percentage(rate, D("0.123456789012")), value)
    assert f == D("1000.123456789011999999999")  # 999.999999999999999999999 + 0.123456789012


def test_cell_price_is_the_first_rule_the_values_carry_else_the_default():
    m = Matrix(
        [
            Cell({"model": "large", "region": "eu"}, D("0.003")),
            Cell({"model": "large"}, D("0.002")),
            Cell({"region": "eu"}, D("0.0015")),
            Cell({"model": ""}, D("0.0001")),
        ],
        default_unit_price=D("0.001"),
    )
    assert cell_price(m, {"model": "large", "region": "eu"}) == D("0.003")
    assert cell_price(m, {"model": "large", "region": "us"}) == D("0.002")
    assert cell_price(m, {"model": "small", "region": "eu"}) == D("0.0015")  # large-or-eu: first wins
    assert cell_price(m, {"model": "small", "region": "us"}) == D("0.001")
    assert cell_price(m, {"model": "Large", "region": "us"}) == D("0.001")  # exact string equality
    assert cell_price(m, {"model": "", "region": "us"}) == D("0.0001")  # "" is the missing value, matched as any
    assert cell_price(m, {"region": "us"}) == D("0.001")  # a rule never matches a dimension not given
    no_default = Matrix([Cell({"model": "large"}, D("0.002"))])
    assert cell_price(no_default, {"model": "large"}) == D("0.002")
    assert cell_price(no_default, {"model": "small"}) is None
    assert cell_price(Matrix([], D(0)), {"model": "x"}) == D(0)  # a free default is a price, not None


def test_a_whole_matrix_or_percentage_meter_has_no_quantity_price():
    with pytest.raises(TypeError, match="price each cell"):
        price(Matrix([], D(1)), D(5))
    with pytest.raises(TypeError, match="FeeRater"):
        price(CARD, D(5))
    with pytest.raises(TypeError, match="price each cell"):
        Rater(Matrix([], D(1)), D(0), "USD").charge(5)
    # How the engine rates a cell: one per-unit rater per cell.
    r = Rater(PerUnit(cell_price(Matrix([Cell({"model": "large"}, D("0.002"))]), {"model": "large"}) or D(0)), D(0), "USD")
    assert r.charge(1234) == D("2.47")


def test_fee_rater_rounds_the_cumulative_fee_half_up_to_the_minor_unit():
    r = FeeRater("USD")
    assert r.included == 0
    assert r.charge(D("0.445")) == D("0.45")  # HALF_EVEN would give 0.44
    assert r.charge(D("0.4449")) == D("0.44")
    assert r.charge(0) == D("0.00")
    assert FeeRater("JPY").charge(D("2.5")) == D(3)
    assert FeeRater("BHD").charge(D("0.0005")) == D("0.001")
    assert r.charge(D("0.445")) == r.charge(D("0.445"))  # memoised: the same answer again
    with localcontext() as ctx:
        ctx.prec = 3
        assert FeeRater("USD").charge(D("123456789.005")) == D("123456789.01")


fee_models = st.sampled_from(
    [CARD, Percentage(D("0.0137")), Percentage(D("0.015"), D("0.25"), max_fee=D("2.5")), Percentage(D(0), D("0.005"))]
)
amounts = st.integers(0, 10**7) | st.decimals(0, 10**6, places=2).map(D)


@given(fee_models, st.lists(amounts, max_size=40), st.lists(st.integers(0, 40), max_size=8), st.sampled_from(["USD", "JPY", "BHD"]))
def test_percentage_lines_telescope_to_the_rounded_period_fee(model, values, cuts, currency):
    """However a period's events fall into windows, the lines (differences of the rounded
    cumulative fee) add up to the rounded sum of the events' exact fees."""
    r = FeeRater(currency)
    bounds = sorted({0, len(values), *(c % (len(values) + 1) for c in cuts)})
    cum, total = D(0), D(0)
    for lo, hi in itertools.pairwise(bounds):
        after = cum + sum((fee(model, v) for v in values[lo:hi]), D(0))
        total += r.charge(after) - r.charge(cum)
        cum = after
    exact = sum((fee(model, v) for v in values), D(0))
    assert total == FeeRater(currency).charge(exact)  # fresh rater: no cache effects
    assert total == exact.quantize(quantum(currency), rounding=ROUND_HALF_UP)
    assert total.as_tuple().exponent >= quantum(currency).as_tuple().exponent


# -- docs/pricing.md: its catalog is valid and its numbers are what both models compute ----
def _doc_catalog():
    text = (Path(__file__).resolve().parents[2] / "docs" / "pricing.md").read_text()
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def _doc_events():
    def at(day, hms):
        h, m, s = (int(x) for x in hms.split(":"))
        return datetime(2026, 3, day, h, m, s, tzinfo=UTC)

    def e(name, etype, day, hms, data):
        return name, ev("acme", etype, at(day, hms), data, id=name)

    return [
        e("E1", "llm.completion", 1, "10:00:05", {"model": "large", "region": "eu", "tokens": 1500}),
        e("E2", "llm.completion", 1, "10:00:20", {"model": "large", "region": "us", "tokens": 2500}),
        e("E3", "llm.completion", 1, "10:00:40", {"model": "small", "region": "eu", "tokens": 4010}),
        e("E4", "llm.completion", 1, "10:01:10", {"model": "large", "region": "eu", "tokens": 500}),
        e("E5", "llm.completion", 1, "10:01:30", {"tokens": 100}),
        *(
            e(f"P{i}", "payment.captured", 2, t, {"amount": a})
            for i, (t, a) in enumerate(
                [("12:00:10", 100.0), ("12:00:30", 5.0), ("12:01:10", 1000.0), ("12:01:40", 12.5), ("12:02:05", 12.5), ("12:02:35", 12.5)],
                1,
            )
        ),
        *(
            e(f"S{i}", "seats.sampled", 3, t, {"seats": n})
            for i, (t, n) in enumerate([("09:00:10", 10), ("09:00:40", 12), ("09:05:00", 11), ("09:07:00", 10), ("09:01:30", 3)], 1)
        ),
        *(
            e(f"M{i}", "storage.sampled", 4, t, {"gb": n})
            for i, (t, n) in enumerate([("08:00:00", 120), ("08:30:00", 80), ("09:00:00", 95), ("08:15:00", 60)], 1)
        ),
    ]


def test_the_worked_examples_hold_in_the_reference_model():
    cat = _doc_catalog()
    parse_catalog(cat)  # the page's catalog is a valid catalog
    got = expected([raw for _, raw in _doc_events()], cat, 3600)
    k = ("acme", "llm_tokens", "2026-03")
    assert (got.accepted, dict(got.dead), got.duplicates) == (20, {}, 0)
    assert (got.quantity[k], got.amount[k]) == (D(8610), D("13.06"))
    cells = {c: (got.cell_quantity[(*k, c)], got.cell_amount[(*k, c)]) for (*_, c) in got.cell_quantity}
    assert cells == {
        ("large", "eu"): (D(2000), D("6.00")),
        ("large", "us"): (D(2500), D("5.00")),
        ("small", "eu"): (D(4010), D("2.01")),
        ("", ""): (D(100), D("0.05")),
    }
    assert (got.quantity[("acme", "payments", "2026-03")], got.amount[("acme", "payments", "2026-03")]) == (D("1142.50"), D("15.69"))
    assert (got.quantity[("acme", "avg_seats", "2026-03")], got.amount[("acme", "avg_seats", "2026-03")]) == (D("9.2"), D("46.00"))
    assert (got.quantity[("acme", "min_storage", "2026-03")], got.amount[("acme", "min_storage", "2026-03")]) == (D(60), D("6.00"))
    assert got.spend_alerts == {("acme", "2026-03", "spend:25.00"): "P3", ("acme", "2026-03", "spend:80.00"): "S2"}
    assert sum(got.amount.values()) == D("80.75")


def test_the_worked_examples_hold_in_the_operators():
    cat = parse_catalog(_doc_catalog())
    pm = cat.plans[0].meters
    matrix, card = pm["llm_tokens"].price, pm["payments"].price
    assert isinstance(matrix, Matrix) and isinstance(card, Percentage)
    # Matrix: the cells' unit prices, and the 10:01 window of (large, eu).
    prices = [cell_price(matrix, {"model": m, "region": r}) for m, r in [("large", "eu"), ("large", "us"), ("small", "eu"), ("", "")]]
    assert prices == [D("0.003"), D("0.002"), D("0.0005"), D("0.0005")]
    large_eu = Rater(PerUnit(D("0.003")), D(0), "USD")
    assert (large_eu.charge(1500), large_eu.charge(2000) - large_eu.charge(1500)) == (D("4.50"), D("1.50"))
    assert Rater(PerUnit(D("0.0005")), D(0), "USD").charge(4010) == D("2.01")
    # Percentage: the fees and the three windows' lines.
    fees = [fee(card, D(a)) for a in ("100.00", "5.00", "1000.00", "12.50", "12.50", "12.50")]
    assert fees[:3] == [D("3.2"), D("0.50"), D("10.00")] and fees[3] == D("0.6625")
    r, cum, lines = FeeRater("USD"), D(0), []
    for window in (fees[:2], fees[2:4], fees[4:]):
        after = cum + sum(window, D(0))
        lines.append(r.charge(after) - r.charge(cum))
        cum = after
    assert lines == [D("3.70"), D("10.66"), D("1.33")] and sum(lines) == D("15.69")
    # AVG: windows 09:00, 09:05, 09:07, then the late 09:01 one.
    seats, amounts = AvgAgg(), []
    rate = Rater(PerUnit(D("5.00")), D(0), "USD")
    for window in ([10, 12], [11], [10], [3]):
        before = rate.charge(seats.value())
        w = AvgAgg()
        for v in window:
            w.add(v, 0)
        seats.merge(w)
        amounts.append(rate.charge(seats.value()) - before)
    assert amounts == [D("55.00"), D("0.00"), D("-1.25"), D("-7.75")] and seats.value() == D("9.2")
    # MIN.
    low = MinAgg()
    for v in (120, 80, 95, 60):
        low.add(v, 0)
    assert Rater(PerUnit(D("0.10")), D(0), "USD").charge(low.value()) == D("6.00")
