"""Contracts in the catalog (SPEC §9): dimensions, matrix, percentage, AVG/MIN, spend
thresholds. A bad one stops start-up with one line naming the field and the fix."""

import copy
from decimal import Decimal

import pytest

from schemas.catalog import CatalogError, Cell, Matrix, Percentage, SpendThreshold, parse_catalog, quantum
from tests.support.events import CATALOG

D = Decimal

CONTRACTS = copy.deepcopy(CATALOG)
CONTRACTS["meters"] += [
    # 5: a matrix meter
    {"slug": "llm", "event_type": "llm.call", "aggregation": "SUM", "value_path": "tokens", "dimensions": ["model", "region"]},
    # 6: payment volume
    {"slug": "payments", "event_type": "payment.captured", "aggregation": "SUM", "value_path": "amount"},
    # 7, 8
    {"slug": "latency", "event_type": "probe", "aggregation": "AVG", "value_path": "ms"},
    {"slug": "floor", "event_type": "disk", "aggregation": "MIN", "value_path": "usage.gb"},
    # 9: a COUNT meter split by one dimension
    {"slug": "requests", "event_type": "http.request", "aggregation": "COUNT", "dimensions": ["route"]},
]
CONTRACTS["plans"][0]["meters"].update(
    llm={
        "product_code": "LLM",
        "price": {
            "model": "matrix",
            "cells": [
                {"when": {"model": "large"}, "unit_price": "0.002"},
                {"when": {"model": "small", "region": "eu"}, "unit_price": "0.0005"},
            ],
            "default_unit_price": "0.001",
        },
        "thresholds": [{"absolute": 1000}],
    },
    payments={
        "product_code": "PAY",
        "price": {"model": "percentage", "rate": "0.029", "fixed_fee": "0.30", "min_fee": "0.50", "max_fee": "10"},
    },
    latency={"product_code": "LAT", "price": {"model": "per_unit", "unit_price": "0.01"}},
    floor={"product_code": "FLOOR", "price": {"model": "per_unit", "unit_price": "1"}},
    requests={"product_code": "REQ", "price": {"model": "matrix", "cells": [{"when": {"route": "/v1/chat"}, "unit_price": "0.01"}]}},
)
CONTRACTS["plans"][0]["spend_thresholds"] = [{"amount": "100.00"}, {"amount": 500, "notify": ["crm"]}]


def broken(edit):
    cat = copy.deepcopy(CONTRACTS)
    edit(cat)
    return cat


def basic(c):
    return c["plans"][0]


def llm(c):
    return basic(c)["meters"]["llm"]


def test_the_contracts_catalog_is_valid_and_typed():
    cat = parse_catalog(CONTRACTS)
    assert [m.dimensions for m in cat.meters][5] == ["model", "region"]
    assert cat.meters[0].dimensions == []
    plan = cat.plans[0]
    m = plan.meters["llm"].price
    assert isinstance(m, Matrix) and m.max_cells == 1000 and m.cells[0] == Cell({"model": "large"}, D("0.002"))
    p = plan.meters["payments"].price
    assert p == Percentage(D("0.029"), D("0.30"), D("0.50"), D(10))
    assert Percentage(D("0.01")).fixed_fee == 0 and Percentage(D("0.01")).min_fee is None
    assert [t.level for t in plan.spend_thresholds] == ["spend:100.00", "spend:500"]
    assert plan.spend_thresholds[0].notify == ["crm", "success"] and plan.spend_thresholds[1].notify == ["crm"]
    assert cat.plans[1].spend_thresholds == []


def test_spend_level_is_the_amount_as_written():
    assert SpendThreshold(D("100.00")).level == "spend:100.00"
    assert SpendThreshold(D("2500")).level == "spend:2500"


def test_minor_units_live_with_the_catalog_and_pricing_uses_them():
    from operators import pricing

    assert pricing.quantum is quantum
    assert (quantum("USD"), quantum("JPY"), quantum("BHD")) == (D("0.01"), D(1), D("0.001"))


def _pop(d, k):
    d.pop(k)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        # AVG and MIN read a value like MAX.
        (lambda c: _pop(c["meters"][7], "value_path"), ["$.meters[7].value_path", "AVG meter 'latency' needs a value_path"]),
        (lambda c: _pop(c["meters"][8], "value_path"), ["$.meters[8].value_path", "MIN meter 'floor' needs a value_path"]),
        (lambda c: c["meters"][7].update(aggregation="MEDIAN"), ["aggregation", "AVG and MIN"]),
        (lambda c: c["meters"][7].update(value_path="a..b"), ["$.meters[7].value_path", "not a data path"]),
        # Dimensions.
        (lambda c: c["meters"][2].update(dimensions=["region"]), ["$.meters[2].dimensions", "MAX meter 'storage'", "only SUM and COUNT"]),
        (lambda c: c["meters"][7].update(dimensions=["region"]), ["$.meters[7].dimensions", "AVG meter"]),
        (lambda c: c["meters"][5].update(dimensions=["a", "b", "c", "d"]), ["$.meters[5].dimensions", "4 dimensions", "at most 3"]),
        (lambda c: c["meters"][5].update(dimensions=["model", "model"]), ["$.meters[5].dimensions[1]", "overlaps dimensions[0]"]),
        (lambda c: c["meters"][5].update(dimensions=["req", "req.region"]), ["$.meters[5].dimensions[1]", "overlaps dimensions[0]"]),
        (lambda c: c["meters"][5].update(dimensions=["tokens"]), ["$.meters[5].dimensions[0]", "value_path 'tokens'"]),
        (lambda c: c["meters"][5].update(dimensions=["model name"]), ["$.meters[5].dimensions[0]", "not a data path"]),
        (lambda c: c["meters"][5].update(dimensions=[""]), ["$.meters[5].dimensions[0]", "not a data path"]),
        (
            lambda c: c["meters"].append({"slug": "by_model", "event_type": "llm.call", "aggregation": "SUM", "value_path": "model"}),
            ["$.meters[10].value_path", "overlaps dimensions[0] 'model' of meter 'llm'"],
        ),
        # Matrix.
        (
            lambda c: basic(c)["meters"]["tokens"].update(price={"model": "matrix", "default_unit_price": "1"}, included=0, thresholds=[]),
            ["$.plans[0].meters.tokens.price", "meter 'tokens' names none", "add dimensions"],
        ),
        (
            lambda c: llm(c).update(included=100),
            ["$.plans[0].meters.llm.included", "matrix prices each cell from its first unit; remove included"],
        ),
        (
            lambda c: llm(c).update(thresholds=[{"fraction": "0.8"}]),
            ["$.plans[0].meters.llm.thresholds[0].fraction", "use 'absolute'", "over all cells"],
        ),
        (lambda c: llm(c).update(price={"model": "matrix"}), ["$.plans[0].meters.llm.price", "'cells', a 'default_unit_price'"]),
        (lambda c: llm(c)["price"]["cells"][0].update(when={}), ["$.plans[0].meters.llm.price.cells[0].when", "empty"]),
        (
            lambda c: llm(c)["price"]["cells"][1]["when"].update(tier="gold"),
            ["$.plans[0].meters.llm.price.cells[1].when.tier", "not a dimension of meter 'llm'"],
        ),
        (lambda c: llm(c)["price"]["cells"][0]["when"].update(model="x" * 65), ["cells[0].when.model", "65 characters", "at most 64"]),
        (lambda c: llm(c)["price"]["cells"][0]["when"].update(model=7), ["cells[0].when", "Expected `str`", "quote numbers"]),
        (
            lambda c: llm(c)["price"]["cells"].append({"when": {"model": "large", "region": "us"}, "unit_price": "1"}),
            ["$.plans[0].meters.llm.price.cells[2]", "never matches", "cells[0]"],
        ),
        (lambda c: llm(c)["price"]["cells"][0].update(unit_price="-0.1"), ["llm.price.cells[0].unit_price", "non-negative"]),
        (lambda c: llm(c)["price"].update(default_unit_price="-1"), ["llm.price.default_unit_price", "non-negative"]),
        (lambda c: llm(c)["price"].update(max_cells=0), ["max_cells", ">= 1"]),
        (lambda c: llm(c)["price"].update(model="grid"), ["'grid'", "matrix and percentage"]),
        # Percentage.
        (
            lambda c: basic(c)["meters"]["calls"].update(price={"model": "percentage", "rate": "0.01"}, included=0, thresholds=[]),
            ["$.plans[0].meters.calls.price", "needs a SUM meter", "meter 'calls' is COUNT"],
        ),
        (lambda c: basic(c)["meters"]["payments"].update(included=5), ["$.plans[0].meters.payments.included", "remove included"]),
        (lambda c: basic(c)["meters"]["payments"]["price"].update(rate="-0.01"), ["payments.price.rate", "non-negative"]),
        (lambda c: basic(c)["meters"]["payments"]["price"].update(fixed_fee="-1"), ["payments.price.fixed_fee", "non-negative"]),
        (lambda c: basic(c)["meters"]["payments"]["price"].update(min_fee="-1"), ["payments.price.min_fee", "non-negative"]),
        (
            lambda c: basic(c)["meters"]["payments"]["price"].update(min_fee="20"),
            ["$.plans[0].meters.payments.price.min_fee", "above max_fee 10"],
        ),
        (lambda c: basic(c)["meters"]["payments"]["price"].pop("rate"), ["rate"]),
        # Spend thresholds.
        (lambda c: basic(c)["spend_thresholds"][0].update(amount="0"), ["$.plans[0].spend_thresholds[0].amount", "positive"]),
        (lambda c: basic(c)["spend_thresholds"][0].update(amount="-5"), ["$.plans[0].spend_thresholds[0].amount", "positive"]),
        (
            lambda c: basic(c)["spend_thresholds"][0].update(amount="100.005"),
            ["spend_thresholds[0].amount", "minor unit 0.01", "round it to 100.01"],
        ),
        (lambda c: basic(c)["spend_thresholds"][1].update(amount="100"), ["$.plans[0].spend_thresholds[1].amount", "spend_thresholds[0]"]),
        (lambda c: basic(c)["spend_thresholds"][0].update(notify=["email"]), ["spend_thresholds[0].notify"]),
        (lambda c: c["plans"][1].update(currency="JPY", spend_thresholds=[{"amount": "99.5"}]), ["$.plans[1].spend_thresholds[0]", "JPY"]),
    ],
)
def test_bad_contract_names_the_field(edit, fragments):
    with pytest.raises(CatalogError) as e:
        parse_catalog(broken(edit))
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: llm(c)["price"]["cells"].append({"when": {"region": "eu"}, "unit_price": "1"}),  # overlaps, but can match
        lambda c: llm(c)["price"].update(cells=[]),  # default only
        lambda c: llm(c)["price"].pop("default_unit_price"),  # cells only: the rest is dead-lettered
        lambda c: llm(c)["price"]["cells"][0]["when"].update(model=""),  # "" is the missing value
        lambda c: c["meters"][9].update(dimensions=["route", "req.region", "zone"]),  # nested, three
        lambda c: c["meters"].append({"slug": "llm2", "event_type": "llm.call", "aggregation": "COUNT", "dimensions": ["model"]}),
        lambda c: basic(c)["meters"]["payments"]["price"].update(min_fee="10"),  # min = max
        lambda c: c["plans"][1].update(currency="JPY", spend_thresholds=[{"amount": 1000}, {"amount": "1E+4"}]),
    ],
)
def test_good_contract_variants_are_accepted(edit):
    parse_catalog(broken(edit))
