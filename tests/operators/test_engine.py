"""Thresholds, windows, rating, lateness and recovery of the per-shard engine."""

import pickle
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from operators.engine import ShardEngine
from operators.engine_state import EngineConfig
from tests.support.events import UPGRADE_AT, Harness, ev

M = timedelta(minutes=1)
S = timedelta(seconds=1)


def test_alert_fires_with_the_crossing_event_not_at_window_close():
    h = Harness()
    out = h.feed(*[ev(at=i * S) for i in range(7)])
    assert out.alerts == []
    crossing = ev(at=7 * S, id="the-8th")
    out = h.feed(crossing)
    assert [a.level for a in out.alerts] == ["80%"]
    a = out.alerts[0]
    assert (a.correlation_id, a.usage, a.limit, a.crm_account_id, a.period) == ("the-8th", 8, Decimal("8.0"), "CRM-1", "2026-03")
    assert a.crossed_at == "2026-03-10T12:00:07.000Z"
    assert out.lines == [], "the window is still open; only the alert went out"


def test_levels_fire_once_each_in_level_order_even_when_one_event_crosses_several():
    h = Harness()
    h.feed(*[ev(at=i * S) for i in range(7)])
    h.feed(ev("acme", "llm.tokens", 8 * S, {"tokens": 5}))  # another meter: no effect on calls
    out = h.feed(*[ev(at=(10 + i) * S) for i in range(20)])
    assert [a.level for a in out.alerts] == ["80%", "100%", "120%"]
    assert h.feed(*[ev(at=(40 + i) * S) for i in range(30)]).alerts == []
    assert h.stats.alerts == {"80%": 1, "100%": 1, "120%": 1}
    assert len({a.alert_id for a in h.alerts}) == 3


def test_alert_ids_are_deterministic_across_runs():
    ids = []
    for _ in range(2):
        h = Harness()
        h.feed(*[ev(at=i * S, id=f"x{i}") for i in range(12)])
        ids.append([a.alert_id for a in h.alerts])
    assert ids[0] == ids[1] and len(ids[0]) == 3


def test_sustained_level_fires_only_after_consecutive_periods_over_it():
    h = Harness()
    h.feed(*[ev(at=i * S) for i in range(11)])  # March: over 100 %
    assert "expansion" not in [a.level for a in h.alerts]
    april = timedelta(days=25)
    out = h.feed(*[ev(at=april + i * S) for i in range(11)])  # April: over again
    assert [a.level for a in out.alerts] == ["80%", "100%", "expansion"]
    exp = out.alerts[-1]
    assert (exp.period, exp.sustained_periods) == ("2026-04", 2)


def test_no_alert_is_fired_again_after_a_restart_from_a_snapshot():
    h = Harness()
    h.feed(*[ev(at=i * S) for i in range(9)])
    snap = pickle.dumps(h.engine.state())
    restored = ShardEngine.resume(h.validator, h.cfg, h.stats, pickle.loads(snap))
    h.engine = restored
    out = h.feed(*[ev(at=(20 + i) * S) for i in range(2)])  # 11 calls: past 80 % again, and 100 %
    assert [a.level for a in out.alerts] == ["100%"]
    assert [a.level for a in h.alerts] == ["80%", "100%"]


def test_windows_close_when_the_watermark_passes_and_carry_exact_amounts():
    h = Harness()
    h.feed(*[ev(at=i * S) for i in range(15)])  # 12:00 window: 15 calls, 10 included
    assert h.lines == []
    h.feed(*[ev(at=M + i * S) for i in range(4)])  # 12:01 window opens, 12:00 closes
    assert len(h.lines) == 1
    ln = h.lines[0]
    assert (ln.quantity, ln.amount, ln.event_count, ln.revision) == (15, Decimal("0.50"), 15, 0)
    assert (ln.window_start, ln.window_end) == ("2026-03-10T12:00:00.000Z", "2026-03-10T12:01:00.000Z")
    assert (ln.erp_customer_id, ln.contract_id, ln.product_code, ln.pricing_version) == ("ERP-1", "C-1", "CALLS", "basic:v1")
    h.flush()
    assert [ln.quantity for ln in h.lines] == [15, 4]
    assert sum(ln.amount for ln in h.lines) == Decimal("0.90")  # (19 - 10) * 0.10


def test_allowed_lateness_delays_the_close():
    h = Harness(EngineConfig(allowed_lateness_ms=30_000))
    h.feed(ev(at=0 * S), ev(at=M + 10 * S))
    assert h.lines == []
    h.feed(ev(at=M + 31 * S))
    assert len(h.lines) == 1


def test_a_quiet_tenant_is_flushed_by_the_idle_timer():
    h = Harness(EngineConfig(idle_timeout_s=30))
    h.feed(ev(at=0 * S), now=1000.0)
    assert h.engine.next_idle_deadline() == 1030.0
    assert h.engine.flush_idle(1029.0).lines == []
    out = h.engine.flush_idle(1030.0)
    assert [ln.quantity for ln in out.lines] == [1]
    assert h.engine.next_idle_deadline() is None


def test_late_event_for_a_closed_window_is_a_signed_correction_never_a_reemission():
    h = Harness()
    h.feed(*[ev(at=i * S) for i in range(12)])
    h.feed(ev(at=2 * M))  # closes 12:00 (12 calls -> 0.20)
    original = h.lines[0]
    out = h.feed(ev(at=30 * S), ev(at=40 * S))  # late for 12:00
    assert len(out.lines) == 1
    corr = out.lines[0]
    assert (corr.window_start, corr.revision, corr.quantity, corr.amount, corr.event_count) == (
        original.window_start,
        1,
        2,
        Decimal("0.20"),
        2,
    )
    assert corr.line_id != original.line_id
    out = h.feed(ev(at=50 * S))
    assert out.lines[0].revision == 2
    h.flush()
    assert sum(ln.amount for ln in h.lines) == (Decimal(16) - 10) * Decimal("0.10")
    assert len({ln.line_id for ln in h.lines}) == len(h.lines)


def test_event_past_its_periods_grace_is_a_too_late_dead_letter():
    h = Harness(EngineConfig(grace_ms=3_600_000))
    h.feed(ev(at=datetime(2026, 3, 31, 12, tzinfo=UTC)))
    h.feed(ev(at=datetime(2026, 4, 1, 1, tzinfo=UTC)))  # March is final since 01:00
    out = h.feed(ev(at=datetime(2026, 3, 31, 23, tzinfo=UTC), id="too-late"))
    assert [(d.reason, d.event_id) for d in out.dead] == [("too_late", "too-late")]
    assert h.stats.dead["too_late"] == 1
    assert out.dead[0].payload.startswith(b"{") and out.dead[0].offset == 2
    ok = h.feed(ev(at=datetime(2026, 4, 1, 0, 30, tzinfo=UTC)))  # April: still open
    assert ok.dead == []


def test_plan_upgrade_mid_period_changes_price_and_thresholds_from_its_effective_time():
    h = Harness()
    before = UPGRADE_AT - timedelta(hours=1)
    h.feed(*[ev("bolt", at=before + i * S) for i in range(11)])  # basic: 80 %, 100 % of 10
    assert [a.level for a in h.alerts] == ["80%", "100%"]
    after = UPGRADE_AT + timedelta(hours=1)
    # Under plus the 120 % level of basic (12 calls) no longer exists: crossing 12 fires nothing.
    out = h.feed(*[ev("bolt", at=after + i * S) for i in range(5)])
    assert out.alerts == []
    # Plus's own levels are new thresholds on the usage under plus (the 11 basic calls do not
    # count): 80 % of its 100 included fires at the 80th call since the upgrade.
    out = h.feed(*[ev("bolt", at=after + timedelta(seconds=10 + i)) for i in range(74)])
    assert out.alerts == []
    out = h.feed(ev("bolt", at=after + timedelta(seconds=90)))
    assert [(a.level, a.usage, a.plan_id) for a in out.alerts] == [("80%", 80, "plus")]
    h.flush()
    by_version: dict[str, Decimal] = {}
    for ln in h.lines:
        by_version[ln.pricing_version] = by_version.get(ln.pricing_version, 0) + ln.quantity
    assert by_version == {"basic:v1": 11, "plus:v2": 80}
    # Each pricing version rates the usage that happened under it, with its own included quantity.
    assert sum(ln.amount for ln in h.lines) == (11 - 10) * Decimal("0.10")


def test_aggregations_max_unique_latest():
    h = Harness()
    h.feed(
        ev("acme", "storage.snapshot", 1 * S, {"usage": {"gb": 3.5}}),
        ev("acme", "storage.snapshot", 2 * S, {"usage": {"gb": 7.25}}),
        ev("acme", "storage.snapshot", 3 * S, {"usage": {"gb": 1}}),
        ev("acme", "user.active", 4 * S, {"user_id": "u1"}),
        ev("acme", "user.active", 5 * S, {"user_id": "u2"}),
        ev("acme", "user.active", 6 * S, {"user_id": "u1"}),
        ev("acme", "seats.updated", 9 * S, {"seats": 12}),
        ev("acme", "seats.updated", 7 * S, {"seats": 30}),  # older: LATEST ignores it
    )
    h.feed(ev("acme", "user.active", M + 1 * S, {"user_id": "u3"}), ev("acme", "storage.snapshot", M + 2 * S, {"usage": {"gb": 9}}))
    h.flush()
    q: dict[str, Decimal] = {}
    amt: dict[str, Decimal] = {}
    for ln in h.lines:
        q[ln.meter] = q.get(ln.meter, 0) + ln.quantity
        amt[ln.meter] = amt.get(ln.meter, 0) + ln.amount
    assert q == {"storage": Decimal(9), "users": 3, "seats": 12}
    assert amt == {"storage": Decimal("2.25"), "users": Decimal(2), "seats": Decimal(12 * 4)}


def test_conservation_counts_every_record_once():
    h = Harness()
    e = ev(at=1 * S)
    h.feed(e, e, ev("nobody"), b"{", ev(at=2 * S))
    s = h.stats
    assert (s.records_in, s.accepted, s.duplicates, sum(s.dead.values())) == (5, 2, 1, 2)
    assert s.conservation_gap() == 0


def test_iso_matches_the_standard_library():
    from datetime import UTC, datetime

    from operators.periods import iso

    for ms in (0, 1, 999, 86_399_999, 1_761_955_199_999, 1_761_955_200_000, 4_102_444_800_123):
        expect = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
        assert iso(ms) == expect


def test_stable_id_is_a_standard_uuid5():
    import uuid

    from operators.ids import _NS, stable_id

    for parts in [("line", "t-1", "tokens", 0, "starter:v1", 0), ("alert", "ä", "x", "2026-11", "p:v1", "80%")]:
        assert stable_id(*parts) == str(uuid.uuid5(uuid.UUID(bytes=_NS), "|".join(map(str, parts))))


def test_idle_deadline_may_fire_early_but_never_late():
    h = Harness(EngineConfig(idle_timeout_s=30))
    h.feed(ev("acme", at=0 * S), now=1000.0)
    h.feed(ev("bolt", at=0 * S), now=1010.0)
    assert h.engine.next_idle_deadline() == 1030.0
    h.feed(ev("acme", at=1 * S), now=1020.0)  # same window: the cached deadline is now early
    assert h.engine.next_idle_deadline() == 1030.0
    assert h.engine.flush_idle(1030.0).lines == []  # early fire: nobody is idle yet
    assert h.engine.next_idle_deadline() == 1040.0  # recomputed exactly
    assert [ln.tenant_id for ln in h.engine.flush_idle(1040.0).lines] == ["bolt"]
    assert h.engine.next_idle_deadline() == 1050.0
