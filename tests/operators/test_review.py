"""Review before posting (SPEC §10.1), where lines are made: the rules of the catalog's
`review:` section and tenants marked `review: true` set a line's `review` (and its draws'),
which the ERP delivery holds back for a person."""

from __future__ import annotations

import copy
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from operators import credits
from operators.review import KEEP_PERIODS, add_gross, hold_reason
from schemas.catalog import CatalogError, ReviewRules, parse_catalog
from tests.operators.test_credits import grant
from tests.support.events import CATALOG, T0, Harness, ev

D = Decimal
S, MIN = timedelta(seconds=1), timedelta(minutes=1)


def test_the_rules_say_why_a_line_waits() -> None:
    rules = ReviewRules(line_amount_over={"USD": D("100.00")}, period_gross_over_previous=D(3))
    assert hold_reason(rules, False, D("100.00"), "USD", D("100.00"), None) is None  # at the limit: posted
    assert hold_reason(rules, False, D("100.01"), "USD", D("100.01"), None).startswith("amount_over_limit: USD 100.01")  # type: ignore[union-attr]
    assert hold_reason(rules, False, D("500"), "EUR", D("500"), None) is None  # no limit for EUR
    assert hold_reason(rules, False, D("1"), "USD", D("31"), D("10")).startswith("gross_spike: ")  # type: ignore[union-attr]
    assert hold_reason(rules, False, D("1"), "USD", D("30"), D("10")) is None  # 3 x exactly: not above
    assert hold_reason(rules, False, D("1"), "USD", D("31"), None) is None  # no previous period: no spike
    assert hold_reason(rules, False, D("1"), "USD", D("31"), D(0)) is None
    assert hold_reason(None, True, D("-1"), "USD", D(0), None) == "tenant_under_review: the catalog marks this tenant review: true"
    assert hold_reason(None, False, D("1e9"), "USD", D("1e9"), D(1)) is None


def test_the_emitted_gross_keeps_a_few_periods() -> None:
    g: dict[str, Decimal] = {}
    for month in range(1, 7):
        assert add_gross(g, f"2026-{month:02d}", D(month)) == D(month)
    assert add_gross(g, "2026-06", D(1)) == D(7)
    assert sorted(g) == ["2026-04", "2026-05", "2026-06"] and len(g) == KEEP_PERIODS


def _catalog(**review: Any) -> dict[str, Any]:
    cat: dict[str, Any] = copy.deepcopy(CATALOG)
    cat["review"] = review
    return cat


def test_a_line_over_its_currencys_limit_is_held_and_a_smaller_one_is_not() -> None:
    h = Harness(catalog=_catalog(line_amount_over={"USD": "1.00"}))
    h.feed(*[ev("acme", at=i * S) for i in range(25)])  # 15 over the 10 included: 1.50
    h.feed(*[ev("bolt", at=i * S) for i in range(15)])  # 5 over: 0.50
    h.flush()
    by = {ln.tenant_id: ln for ln in h.lines}
    assert by["acme"].amount == D("1.50") and by["acme"].review.startswith("amount_over_limit: USD 1.50 is over")
    assert by["bolt"].amount == D("0.50") and by["bolt"].review is None


def test_a_correction_of_a_held_window_waits_with_it_and_others_do_not() -> None:
    """A late event reopens acme's held window: its correction (USD 0.10, under the limit) is
    held too, since posting a delta of a line that waits, or was rejected, bills nothing real;
    bolt's correction of a posted window posts."""
    h = Harness(catalog=_catalog(line_amount_over={"USD": "1.00"}))
    h.feed(*[ev(t, at=i * S) for t in ("acme", "bolt") for i in range(25)])  # each 1.50: held
    h.feed(*[ev("bolt", at=MIN + i * S) for i in range(5)], *[ev("acme", at=MIN + i * S) for i in range(5)])
    h.feed(ev("acme", at=3 * MIN), ev("bolt", at=3 * MIN))  # closes their first and second windows
    h.feed(ev("acme", at=30 * S), ev("bolt", at=MIN + 30 * S))  # late: acme's held window, bolt's posted second one
    h.flush()
    got = sorted((ln.tenant_id, ln.revision, ln.amount, (ln.review or "").split(":")[0]) for ln in h.lines)
    assert ("acme", 1, D("0.10"), "correction_of_held") in got
    assert ("bolt", 1, D("0.10"), "") in got
    assert all(review == "amount_over_limit" for _, rev, amount, review in got if rev == 0 and amount > 1)


def test_held_windows_are_remembered_until_their_period_is_final() -> None:
    """What keeps a held window's corrections waiting lasts as long as corrections can come:
    dropped once its period is past its grace, not before (a daily plan's periods pass in a
    day; grace may be longer)."""
    h = Harness(catalog=_catalog(line_amount_over={"USD": "1.00"}))
    h.feed(*[ev("acme", at=i * S) for i in range(25)], ev("acme", at=3 * MIN))
    assert "2026-03" in h.engine.tenants["acme"].held
    april = timedelta(days=22)  # T0 is 10 March, noon: 1 April, noon
    h.feed(ev("acme", at=april - timedelta(hours=12, minutes=30)))  # April, within March's hour of grace ...
    assert "2026-03" in h.engine.tenants["acme"].held
    h.feed(ev("acme", at=april))  # ... and now past it
    assert "2026-03" not in h.engine.tenants["acme"].held


def test_a_tenant_marked_for_review_has_every_line_and_draw_held() -> None:
    cat = _catalog()
    cat["tenants"][0]["review"] = True
    h = Harness(catalog=cat)
    h.feed(grant("g-1", "1.00"), *[ev("acme", at=i * S) for i in range(25)])
    h.flush()
    (ln,) = [ln for ln in h.lines if ln.tenant_id == "acme"]
    assert ln.review == "tenant_under_review: the catalog marks this tenant review: true"
    (draw,) = credits.line_records(ln)
    assert (draw.kind, draw.amount, draw.review) == ("drawn", D("1.00"), ln.review)  # held with its line


def test_a_period_spiking_over_its_previous_one_is_held_from_the_line_that_crosses() -> None:
    """acme's February comes to USD 0.50; in March the rule (3 x) allows 1.50: the first
    window (USD 1.00) posts, the second (to 3.00) is held, and so is every later line."""
    h = Harness(catalog=_catalog(period_gross_over_previous="3"))
    feb = T0 - timedelta(days=20)
    h.feed(*[ev("acme", at=feb + i * S) for i in range(15)])
    h.feed(*[ev("acme", at=i * S) for i in range(20)])  # closes February's window: USD 0.50
    h.feed(*[ev("acme", at=2 * MIN + i * S) for i in range(20)])  # closes March's first: USD 1.00
    h.feed(*[ev("acme", at=4 * MIN + i * S) for i in range(5)])  # closes the second: to USD 3.00
    h.flush()
    got = [(ln.period, ln.amount, (ln.review or "").split(":")[0]) for ln in h.lines]
    assert got == [
        ("2026-02", D("0.50"), ""),
        ("2026-03", D("1.00"), ""),
        ("2026-03", D("2.00"), "gross_spike"),
        ("2026-03", D("0.50"), "gross_spike"),
    ]


def test_review_rules_that_cannot_work_stop_the_catalog_with_the_field_named() -> None:
    with pytest.raises(CatalogError, match=r"\$\.review\.period_gross_over_previous: 1 .* use a factor above 1"):
        parse_catalog(_catalog(period_gross_over_previous="1"))
    with pytest.raises(CatalogError, match=r"\$\.review\.line_amount_over\.USD: 0 is not allowed; use a positive number"):
        parse_catalog(_catalog(line_amount_over={"USD": "0"}))
    with pytest.raises(CatalogError, match=r"review"):
        parse_catalog(_catalog(line_amount_over={"usd": "1"}))
