"""The contracts of SPEC §9.1–4 through the engine, as the dataflow drives it: the worked
examples of docs/pricing.md give exactly the lines, dead letters and alerts the page shows,
the read model derives the same money from its facts, and the register keeps each cell's
lines apart."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

from operators.usage import derive, facts
from schemas.outputs import RatedUsageLine
from tests.operators.test_pricing import _doc_catalog, _doc_events
from tests.support.events import Harness

D = Decimal
PERIOD = "2026-03"


def run(catalog: dict[str, Any] | None = None, names: list[str] | None = None, quiet_before: set[str] | None = None) -> Harness:
    """The page's events in order, each its own batch; before a name in `quiet_before` the
    tenant's open windows close on the idle timer (as in the page's late AVG/MIN examples)."""
    h = Harness(catalog=catalog or _doc_catalog())
    now = 1000.0
    for name, raw in _doc_events():
        if names is not None and name not in names:
            continue
        if quiet_before and name in quiet_before:
            now += 60
            out = h.engine.flush_idle(now)
            h.lines += out.lines
        h.feed(raw, now=now)
        now += 0.001
    h.flush()
    return h


def by_meter(lines: list[RatedUsageLine], meter: str) -> list[RatedUsageLine]:
    return [ln for ln in lines if ln.meter == meter]


def test_matrix_lines_one_per_cell_and_window_at_each_cells_price() -> None:
    h = run(names=["E1", "E2", "E3", "E4", "E5"])
    got = [(ln.window_start[11:16], ln.dimensions, ln.quantity, ln.amount) for ln in by_meter(h.lines, "llm_tokens")]
    assert sorted(got, key=str) == sorted(
        [
            ("10:00", {"model": "large", "region": "eu"}, D(1500), D("4.50")),
            ("10:00", {"model": "large", "region": "us"}, D(2500), D("5.00")),
            ("10:00", {"model": "small", "region": "eu"}, D(4010), D("2.01")),
            ("10:01", {"model": "", "region": ""}, D(100), D("0.05")),
            ("10:01", {"model": "large", "region": "eu"}, D(500), D("1.50")),
        ],
        key=str,
    )
    assert len({ln.line_id for ln in h.lines}) == len(h.lines) == 5  # the cell is in the line id
    # The absolute 8000 threshold is on the meter's total over all cells: E3 crosses it.
    assert [(a.level, a.correlation_id, a.usage) for a in h.alerts if a.meter == "llm_tokens"] == [("abs:8000", "E3", D(8010))]


def test_an_unpriced_cell_and_a_cell_past_max_cells_are_dead_letters_and_change_nothing_else() -> None:
    cat = copy.deepcopy(_doc_catalog())
    price = cat["plans"][0]["meters"]["llm_tokens"]["price"]
    del price["default_unit_price"]
    h = run(cat, names=["E1", "E2", "E3", "E4", "E5"])
    assert [(d.reason, d.event_id) for d in h.dead] == [("unpriced_dimension", "E3"), ("unpriced_dimension", "E5")]
    assert "default_unit_price" in h.dead[0].message
    assert sum(ln.amount for ln in h.lines) == D("6.00") + D("5.00")
    price["default_unit_price"], price["max_cells"] = "0.0005", 2
    h = run(cat, names=["E1", "E2", "E3", "E4", "E5"])
    assert [(d.reason, d.event_id) for d in h.dead] == [("too_many_cells", "E3"), ("too_many_cells", "E5")]
    assert "max_cells" in h.dead[0].message and h.stats.conservation_gap() == 0


def test_percentage_lines_telescope_on_the_rounded_cumulative_fee() -> None:
    h = run(names=[f"P{i}" for i in range(1, 7)])
    got = [(ln.window_start[11:16], ln.quantity, ln.amount) for ln in by_meter(h.lines, "payments")]
    assert got == [("12:00", D("105.00"), D("3.70")), ("12:01", D("1012.50"), D("10.66")), ("12:02", D("25.00"), D("1.33"))]


def test_avg_and_min_lower_with_signed_lines_and_late_corrections() -> None:
    h = run(names=["S1", "S2", "S3", "S4", "S5"], quiet_before={"S5"})
    seats = [(ln.window_start[11:16], ln.revision > 0, ln.quantity, ln.amount) for ln in by_meter(h.lines, "avg_seats")]
    assert seats == [
        ("09:00", False, D("11.000000000"), D("55.00")),
        ("09:05", False, D(0), D("0.00")),
        ("09:07", False, D("-0.250000000"), D("-1.25")),
        ("09:01", True, D("-1.550000000"), D("-7.75")),
    ]
    h = run(names=["M1", "M2", "M3", "M4"], quiet_before={"M4"})
    low = [(ln.revision > 0, ln.quantity, ln.amount) for ln in by_meter(h.lines, "min_storage")]
    assert low == [(False, D(120), D("12.00")), (False, D(-40), D("-4.00")), (False, D(0), D("0.00")), (True, D(-20), D("-2.00"))]


def test_spend_thresholds_fire_once_by_the_crossing_event_and_are_never_retracted() -> None:
    h = run(quiet_before={"S5", "M4"})
    spend = [(a.level, a.correlation_id, a.meter, a.destinations) for a in h.alerts if a.level.startswith("spend:")]
    assert spend == [("spend:25.00", "P3", "*", ["crm", "success"]), ("spend:80.00", "S2", "*", ["crm"])]
    assert sum(ln.amount for ln in h.lines) == D("80.75")
    # Fed again from a snapshot of the state: no spend alert fires a second time.
    import pickle

    from operators.engine import ShardEngine

    h.engine = ShardEngine.resume(h.validator, h.cfg, h.stats, pickle.loads(pickle.dumps(h.engine.state())))
    before = len(h.alerts)
    h.feed(_doc_events()[0][1].replace(b'"E1"', b'"E1b"'))
    assert not [a for a in h.alerts[before:] if a.level.startswith("spend:")]


def test_the_read_model_derives_the_same_money_as_the_lines() -> None:
    h = run(quiet_before={"S5", "M4"})
    t = h.engine.tenants["acme"]
    (doc,) = facts(t, 0)
    usage = derive(h.index, doc)
    for meter in ("llm_tokens", "payments", "avg_seats", "min_storage"):
        lines = by_meter(h.lines, meter)
        m = usage.meters[meter]
        assert (m.quantity, m.amount, m.amount_rated) == (sum(ln.quantity for ln in lines), sum(ln.amount for ln in lines), m.amount)
    cells = {tuple(c.dimensions.values()): (c.quantity, c.amount) for c in usage.meters["llm_tokens"].cells}
    assert cells == {
        ("large", "eu"): (D(2000), D("6.00")),
        ("large", "us"): (D(2500), D("5.00")),
        ("small", "eu"): (D(4010), D("2.01")),
        ("", ""): (D(100), D("0.05")),
    }
    assert doc.period == PERIOD
