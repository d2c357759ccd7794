"""Thresholds after a mid-period plan change are measured on the usage under each pricing
version, the same usage that version rates against its `included` (SPEC §2.2); and engine
snapshots from before live totals were kept per version resume with them rebuilt."""

from __future__ import annotations

import copy
import io
import pickle
from datetime import timedelta
from decimal import Decimal
from typing import Any

from connectors.rating import _migrate, _Unpickler
from operators.aggregate import SumAgg
from operators.engine import ShardEngine
from operators.engine_state import TenantState
from tests.support.events import CATALOG, UPGRADE_AT, Harness, ev

MS = timedelta(milliseconds=1)
BEFORE = UPGRADE_AT - timedelta(hours=1)


def _catalog() -> dict[str, Any]:
    """The test catalog at the issue's scale: `bolt` has used 2,000 calls of basic's 2,000
    when it moves to plus (2,500 included: levels at 2,000 and 2,500). Both plans also get a
    SUM and a MAX meter with levels, for the inline and the generic hot paths."""
    cat = copy.deepcopy(CATALOG)
    basic, plus = cat["plans"]
    basic["meters"]["calls"]["included"] = 2000
    plus["meters"]["calls"]["included"] = 2500
    basic["meters"]["storage"]["thresholds"] = [{"absolute": 100, "name": "full"}]
    plus["meters"]["tokens"] = copy.deepcopy(basic["meters"]["tokens"])  # "big" at 500 tokens
    plus["meters"]["storage"] = copy.deepcopy(basic["meters"]["storage"])  # "full" at 100 GB
    return cat


CAT = _catalog()


def calls(n: int, at: Any, prefix: str, first: int = 0) -> list[bytes]:
    """`n` calls of bolt, 100 ms apart from `at`, with ids prefix0, prefix1, ..."""
    return [ev("bolt", at=at + (first + i) * 100 * MS, id=f"{prefix}{first + i}") for i in range(n)]


def alerts(out: Any) -> list[tuple[Any, ...]]:
    return [(a.plan_id, a.level, a.limit, a.usage, a.correlation_id) for a in out.alerts]


def test_new_plans_levels_fire_on_the_usage_under_the_new_version_only() -> None:
    """The issue's example: upgrading from 2,000 used, the new plan's 2,500 level fires after
    2,500 new calls (not 500), its 2,000 level after 2,000 (not on the first new call)."""
    h = Harness(catalog=CAT)
    out = h.feed(*calls(2000, BEFORE, "b"))
    assert [(a.plan_id, a.level, a.usage) for a in out.alerts] == [("basic", "80%", 1600), ("basic", "100%", 2000)]
    new = calls(2500, UPGRADE_AT, "n")
    out = h.feed(*new[:1999])  # 3,999 in the period: past both of plus's levels, not under plus
    assert out.alerts == []
    out = h.feed(new[1999])
    assert alerts(out) == [("plus", "80%", 2000, 2000, "n1999")]
    out = h.feed(*new[2000:2499])
    assert out.alerts == []
    out = h.feed(new[2499])
    assert alerts(out) == [("plus", "100%", 2500, 2500, "n2499")]
    (mp,) = h.engine.tenants["bolt"].periods.values()
    assert (mp.usage("basic:v1"), mp.usage("plus:v2")) == (2000, 2500)


def test_late_events_before_the_upgrade_count_toward_the_old_versions_levels_and_rating() -> None:
    """Late calls dated before the change are basic's usage: they fire basic's 120 % level on
    basic's 2,400 calls, interleaved with plus's calls that do not move them (nor they plus's);
    each version is rated on the same usage its levels saw."""
    h = Harness(catalog=CAT)
    h.feed(*calls(2000, BEFORE, "b"))
    out = h.feed(*calls(1000, UPGRADE_AT, "n"))
    assert out.alerts == []
    late = calls(400, BEFORE, "late", first=2000)  # basic's windows closed meanwhile: corrections
    new = calls(400, UPGRADE_AT, "n", first=1000)
    out = h.feed(*[x for pair in zip(late, new, strict=True) for x in pair])
    assert alerts(out) == [("basic", "120%", 2400, 2400, "late2399")]  # not at 2,400 in the period
    out = h.feed(*calls(599, UPGRADE_AT, "n", first=1400))
    assert out.alerts == []
    out = h.feed(*calls(601, UPGRADE_AT, "n", first=1999))
    assert [(a.plan_id, a.level, a.usage, a.correlation_id) for a in out.alerts] == [
        ("plus", "80%", 2000, "n1999"),
        ("plus", "100%", 2500, "n2499"),
    ]
    (mp,) = h.engine.tenants["bolt"].periods.values()
    assert {pv: agg.value() for pv, agg in mp.live.items()} == {"basic:v1": 2400, "plus:v2": 2600}
    h.flush()
    rated: dict[str, tuple[Any, ...]] = {}
    for ln in h.lines:
        q, a, n = rated.get(ln.pricing_version, (Decimal(0), Decimal(0), 0))
        rated[ln.pricing_version] = (q + ln.quantity, a + ln.amount, n + ln.event_count)
    # Rating is per version as before: basic 400 over its 2,000 at 0.10, plus 100 over 2,500 at 0.05.
    assert rated == {"basic:v1": (2400, Decimal("40.00"), 2400), "plus:v2": (2600, Decimal("5.00"), 2600)}


def test_sum_and_max_meters_measure_each_version_on_its_own_usage() -> None:
    h = Harness(catalog=CAT)
    h.feed(ev("bolt", "llm.tokens", BEFORE, {"tokens": 400}), ev("bolt", "storage.snapshot", BEFORE, {"usage": {"gb": 120}}))
    assert [(a.plan_id, a.level, a.usage) for a in h.alerts] == [("basic", "full", 120)]
    # Under plus: 600 tokens in the period but 200 under plus; storage's max under plus is 50.
    out = h.feed(ev("bolt", "llm.tokens", UPGRADE_AT, {"tokens": 200}), ev("bolt", "storage.snapshot", UPGRADE_AT, {"usage": {"gb": 50}}))
    assert out.alerts == []
    out = h.feed(
        ev("bolt", "llm.tokens", UPGRADE_AT + MS, {"tokens": 300}), ev("bolt", "storage.snapshot", UPGRADE_AT + MS, {"usage": {"gb": 101}})
    )
    assert [(a.plan_id, a.level, a.usage) for a in out.alerts] == [("plus", "big", 500), ("plus", "full", 101)]


def _as_before_the_change(state: dict[str, TenantState]) -> bytes:
    """A snapshot as the engine wrote it before live totals were per version: one live
    aggregate per meter period (all versions merged), hot slots without `live`."""
    for t in state.values():
        for mp in t.periods.values():
            merged = SumAgg() if not mp.live else type(next(iter(mp.live.values())))()
            for agg in mp.live.values():
                merged.merge(agg)  # type: ignore[arg-type]
            mp.live = merged  # type: ignore[assignment]
        for slot in t.hot.values():
            del slot.live
    return pickle.dumps(state)


def test_a_snapshot_from_before_per_version_live_totals_resumes_with_them_rebuilt() -> None:
    h = Harness(catalog=CAT)
    h.feed(*calls(1990, BEFORE, "b"))
    h.feed(*calls(1500, UPGRADE_AT, "n"))  # closes basic's windows: basic's usage is in `closed`
    h.feed(*calls(5, BEFORE, "late", first=1990))  # a correction: merged into basic's `closed`
    h.feed(*calls(1, UPGRADE_AT, "n", first=1500))  # plus's usage: closed and open windows, hot slot
    t = h.engine.tenants["bolt"]
    assert t.open and t.hot
    expected = {k: {pv: agg.value() for pv, agg in mp.live.items()} for k, mp in t.periods.items()}
    assert expected[next(iter(expected))] == {"basic:v1": 1995, "plus:v2": 1501}
    fired = {k: set(mp.fired) for k, mp in t.periods.items()}

    state = _migrate(_Unpickler(io.BytesIO(_as_before_the_change(h.engine.state()))).load())

    t = state["bolt"]
    assert {k: {pv: agg.value() for pv, agg in mp.live.items()} for k, mp in t.periods.items()} == expected
    assert {k: mp.fired for k, mp in t.periods.items()} == fired
    assert t.hot == {}
    h.engine = ShardEngine.resume(h.validator, h.cfg, h.stats, state)
    out = h.feed(*calls(5, BEFORE, "late", first=1995))  # basic reaches 2,000 with these, not before
    assert [(a.plan_id, a.level, a.usage) for a in out.alerts] == [("basic", "100%", 2000)]
    out = h.feed(*calls(498, UPGRADE_AT, "n", first=1501))
    assert out.alerts == []
    out = h.feed(*calls(1, UPGRADE_AT, "n", first=1999))
    assert [(a.plan_id, a.level, a.usage) for a in out.alerts] == [("plus", "80%", 2000)]
    assert _migrate(state) is state and {pv: a.value() for pv, a in t.periods[next(iter(t.periods))].live.items()} == {
        "basic:v1": 2000,
        "plus:v2": 2000,
    }  # migrating again changes nothing


def test_an_old_period_without_per_version_data_keeps_its_total_under_its_levels_version() -> None:
    h = Harness(catalog=CAT)
    h.feed(*calls(3, BEFORE, "b"))
    t = h.engine.tenants["bolt"]
    old = SumAgg()
    old.v = 3
    for mp in t.periods.values():
        mp.live = old  # type: ignore[assignment]
        mp.closed.clear()
    t.open.clear()
    _migrate({"bolt": t})
    assert {pv: a.value() for mp in t.periods.values() for pv, a in mp.live.items()} == {"basic:v1": 3}
