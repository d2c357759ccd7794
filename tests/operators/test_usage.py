"""The read model built from engine state: figures per pricing version after a plan change,
the hard limit, levels with their crossing times, and a forgotten period's last word."""

from __future__ import annotations

import copy
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from operators.engine_state import EngineConfig
from operators.usage import tenant_usage
from schemas.catalog import CatalogError, parse_catalog
from schemas.usage import TenantUsage
from tests.support.events import CATALOG, T0, UPGRADE_AT, Harness, ev

D = Decimal
NOW_MS = int(T0.timestamp() * 1000)


def _catalog(**hard: Any) -> dict[str, Any]:
    cat = copy.deepcopy(CATALOG)
    if hard:
        cat["plans"][0]["meters"]["calls"]["hard_limit"] = hard
    return cat


def docs(h: Harness, tenant: str) -> dict[str, TenantUsage]:
    return {d.period: d for d in tenant_usage(h.index, h.engine.tenants[tenant], NOW_MS)}


def test_after_an_upgrade_used_and_remaining_are_the_new_versions() -> None:
    """bolt moves from basic (10 calls included) to plus (100): 12 calls before, 30 after."""
    h = Harness()
    h.feed(*[ev("bolt", at=UPGRADE_AT - timedelta(hours=1) + timedelta(seconds=i)) for i in range(12)])
    h.feed(*[ev("bolt", at=UPGRADE_AT + timedelta(seconds=i)) for i in range(30)])
    calls = docs(h, "bolt")["2026-03"].meters["calls"]
    assert (calls.pricing_version, calls.used, calls.included, calls.remaining, calls.overage) == ("plus:v2", 30, 100, 70, 0)
    assert calls.quantity == 42 and calls.events == 42
    by_version = {v.pricing_version: (v.quantity, v.included, v.amount) for v in calls.versions}
    # basic bills 2 calls over 10 at 0.10; plus has 70 left of its 100.
    assert by_version == {"basic:v1": (12, 10, D("0.20")), "plus:v2": (30, 100, D("0.00"))}
    assert calls.amount == calls.amount_rated == D("0.20")  # basic's windows closed as the watermark passed them
    levels = [(lv.pricing_version, lv.level, lv.crossed_at) for lv in calls.levels]
    assert levels == [  # by version and limit, each with the event time of the call that reached it
        ("basic:v1", "80%", "2026-03-19T23:00:07.000Z"),
        ("basic:v1", "100%", "2026-03-19T23:00:09.000Z"),
        ("basic:v1", "expansion", "2026-03-19T23:00:09.000Z"),  # reached; it alerts only when sustained
        ("basic:v1", "120%", "2026-03-19T23:00:11.000Z"),
    ]
    h.flush()
    calls = docs(h, "bolt")["2026-03"].meters["calls"]
    assert calls.amount_rated == calls.amount == sum((ln.amount for ln in h.lines if ln.meter == "calls"), D(0))


def test_has_access_closes_at_the_hard_limit_and_opens_in_the_next_period() -> None:
    h = Harness(catalog=_catalog(absolute=12))
    h.feed(*[ev("acme", at=timedelta(seconds=i)) for i in range(11)])
    calls = docs(h, "acme")["2026-03"].meters["calls"]
    assert (calls.used, calls.hard_limit, calls.has_access, calls.overage) == (11, 12, True, 1)
    h.feed(ev("acme", at=timedelta(seconds=20)))
    assert docs(h, "acme")["2026-03"].meters["calls"].has_access is False
    h.feed(ev("acme", at=timedelta(days=25)))  # April
    april = docs(h, "acme")["2026-04"].meters["calls"]
    assert (april.used, april.has_access) == (1, True)


def test_a_hard_limit_as_a_fraction_of_included_and_soft_by_default() -> None:
    h = Harness(catalog=_catalog(fraction="1.5"))
    h.feed(*[ev("acme", at=timedelta(seconds=i)) for i in range(15)])
    calls = docs(h, "acme")["2026-03"].meters["calls"]
    assert (calls.hard_limit, calls.has_access) == (15, False)
    h = Harness()
    h.feed(*[ev("acme", at=timedelta(seconds=i)) for i in range(50)])
    calls = docs(h, "acme")["2026-03"].meters["calls"]
    assert (calls.hard_limit, calls.has_access, calls.overage) == (None, True, 40)


@pytest.mark.parametrize(
    ("hard", "message"),
    [
        ({}, "meters.calls.hard_limit: set exactly one of 'fraction' (of included) or 'absolute'"),
        ({"absolute": 0}, "meters.calls.hard_limit.absolute: 0 is not allowed"),
    ],
)
def test_a_malformed_hard_limit_names_the_field(hard: dict[str, Any], message: str) -> None:
    cat = copy.deepcopy(CATALOG)
    cat["plans"][0]["meters"]["calls"]["hard_limit"] = hard
    with pytest.raises(CatalogError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_catalog(cat)


def test_a_period_past_its_grace_leaves_the_engine_with_its_final_figures() -> None:
    h = Harness(cfg=EngineConfig(grace_ms=60_000, idle_timeout_s=30))
    h.feed(*[ev("acme", "llm.tokens", at=timedelta(seconds=i), data={"tokens": 100}) for i in range(7)])
    out = h.feed(ev("acme", at=timedelta(days=25)))  # April, past March's grace
    assert [(tid, k[0]) for tid, k, _ in out.final] == [("acme", "tokens")]
    t = h.engine.tenants["acme"]
    assert "2026-03" not in docs(h, "acme")
    march = {d.period: d for d in tenant_usage(h.index, t, NOW_MS, [(k, mp) for _, k, mp in out.final])}["2026-03"]
    tokens = march.meters["tokens"]
    assert (tokens.quantity, tokens.events, tokens.amount, tokens.amount_rated) == (700, 7, D("1.80"), D("1.80"))
    assert tokens.last_event_time == "2026-03-10T12:00:06.000Z"
    assert [lv.level for lv in tokens.levels] == ["big"]
