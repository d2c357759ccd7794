"""The read model: what a tenant has used and owes so far in each billing period, built from
the engine's own state for the usage and entitlement API.

Built from absolute period-to-date state, never from deltas, so writing it again after a
crash replay writes the same values; `events` (accepted events in the period, which only
grows along the input) lets the store refuse a write older than the one it holds. Once the
input is drained every window is closed, and `quantity` and `amount` are exactly what
`tallyflow reconcile` recounts (the sum of the period's rated lines).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from decimal import Decimal

from operators.catalog_index import CatalogIndex, PlanIndex, PlanMeterIndex
from operators.engine_state import MeterPeriod, TenantState
from operators.periods import Period, iso
from schemas.usage import Entitlement, LevelCrossed, MeterUsage, TenantUsage, VersionUsage

ZERO = Decimal(0)
NEVER = -(2**62)


def access(pmi: PlanMeterIndex, used: Decimal) -> tuple[Decimal, Decimal, bool]:
    """(remaining, overage, has_access) of `used` under one plan meter: access closes at the
    hard limit, and stays open without one (overage is billed)."""
    included = pmi.rater.included
    return max(included - used, ZERO), max(used - included, ZERO), pmi.hard_limit is None or used < pmi.hard_limit


def entitlement(tenant_id: str, period: str, pmi: PlanMeterIndex, pv: str, used: Decimal, as_of: str, watermark: str | None) -> Entitlement:
    """May the tenant use the meter: `used` measured under the plan meter in force."""
    m = meter_usage(pmi, pv, used)
    return Entitlement(
        tenant_id=tenant_id,
        meter=m.meter,
        period=period,
        has_access=m.has_access,
        included=m.included,
        used=used,
        remaining=m.remaining,
        overage=m.overage,
        hard_limit=m.hard_limit,
        pricing_version=pv,
        as_of=as_of,
        watermark=watermark,
    )


def plan_in_force(cat: CatalogIndex, tenant_id: str, ts_ms: int) -> PlanIndex | None:
    ti = cat.tenants.get(tenant_id)
    if ti is None:
        return None
    return ti.only_plan or ti.plan_at(ts_ms)


# Levels crossed per (tenant, meter, period idx), with the number of fired levels they were
# built from: fired levels only grow, and rarely, so a caller that writes often keeps them.
LevelsCache = dict[tuple[str, str, int], tuple[int, list[LevelCrossed]]]


def tenant_usage(
    cat: CatalogIndex,
    t: TenantState,
    as_of_ms: int,
    final: Iterable[tuple[tuple[str, int], MeterPeriod]] = (),
    levels_cache: LevelsCache | None = None,
) -> list[TenantUsage]:
    """One document per billing period the tenant has state for, and per period in `final`
    (forgotten by the engine since the last write: all of a period's meters are forgotten
    together, once its grace has passed). Runs for every touched tenant at every write of
    the read model: kept to one catalog lookup per period and no work per event."""
    events: dict[tuple[str, int, str], int] = {}  # in open and pending windows, per pricing version
    last: dict[tuple[str, int], int] = {}
    for windows in (t.open, t.pending):
        for (slug, idx, pv, _), acc in windows.items():
            events[(slug, idx, pv)] = events.get((slug, idx, pv), 0) + acc.count
            if acc.last_ms > last.get((slug, idx), NEVER):
                last[(slug, idx)] = acc.last_ms
    docs: dict[str, tuple[TenantUsage, PlanIndex | None]] = {}
    as_of, watermark = iso(as_of_ms), iso(t.watermark)
    for (slug, idx), mp in itertools.chain(t.periods.items(), final):
        p = mp.period
        entry = docs.get(p.key)
        if entry is None:
            start, end = _bounds(p)
            doc = TenantUsage(
                tenant_id=t.tenant_id,
                period=p.key,
                period_start=start,
                period_end=end,
                watermark=watermark,
                as_of=as_of,
                events=0,
                meters={},
            )
            # The plan in force at the tenant's watermark, within the period: the version
            # whose `included` and hard limit the entitlement figures are measured against.
            entry = docs[p.key] = (doc, plan_in_force(cat, t.tenant_id, min(max(t.watermark, p.start_ms), p.end_ms - 1)))
        doc, plan = entry
        levels: list[LevelCrossed] | None = None
        if levels_cache is not None:
            hit = levels_cache.get((t.tenant_id, slug, idx))
            if hit is not None and hit[0] == len(mp.fired):
                levels = hit[1]
        if levels is None:
            levels = _levels(cat, slug, mp)
            if levels_cache is not None:
                levels_cache[(t.tenant_id, slug, idx)] = (len(mp.fired), levels)
        m = _meter(cat, plan, slug, idx, mp, events, max(mp.last_ms, last.get((slug, idx), NEVER)), levels)
        if m is not None:
            doc.meters[slug] = m
            doc.events += m.events
    return [doc for doc, _ in docs.values()]


def _levels(cat: CatalogIndex, slug: str, mp: MeterPeriod) -> list[LevelCrossed]:
    """By pricing version and limit; crossing times are unknown for state older than the read model."""
    plans = cat.plans_by_version
    levels: list[LevelCrossed] = []
    for lpv, name in mp.fired:
        lv = plans[lpv].meters[slug].level(name)
        if lv is not None:
            ms = mp.crossed.get((lpv, name))
            levels.append(LevelCrossed(level=name, limit=lv.limit, pricing_version=lpv, crossed_at=None if ms is None else iso(ms)))
    levels.sort(key=lambda lv: (lv.pricing_version, lv.limit, lv.level))
    return levels


@functools.lru_cache(maxsize=256)
def _bounds(p: Period) -> tuple[str, str]:
    return iso(p.start_ms), iso(p.end_ms)


def _meter(
    cat: CatalogIndex,
    plan: PlanIndex | None,
    slug: str,
    idx: int,
    mp: MeterPeriod,
    open_events: dict[tuple[str, int, str], int],
    last_ms: int,
    levels: list[LevelCrossed],
) -> MeterUsage | None:
    plans = cat.plans_by_version
    live_by, closed_by = mp.live, mp.closed
    pvs = list(live_by) if len(live_by) == 1 and (not closed_by or closed_by.keys() == live_by.keys()) else sorted({*live_by, *closed_by})
    if not pvs:
        return None
    versions: list[VersionUsage] = []
    quantity = amount = rated = ZERO
    for pv in pvs:
        pmi = plans[pv].meters[slug]
        live, closed = live_by.get(pv), closed_by.get(pv)
        q = Decimal(live.value()) if live is not None else ZERO
        qc = closed.value() if closed is not None else 0
        a = pmi.rater.charge(q)
        ar = a if qc == q else pmi.rater.charge(qc)
        quantity, amount, rated = quantity + q, amount + a, rated + ar
        versions.append(
            VersionUsage(
                pricing_version=pv,
                plan_id=pmi.plan.id,
                plan_version=pmi.plan.version,
                quantity=q,
                included=pmi.rater.included,
                amount=a,
                amount_rated=ar,
                events=mp.closed_events.get(pv, 0) + open_events.get((slug, idx, pv), 0),
            )
        )
    if plan is not None and slug in plan.meters:
        cur, pv = plan.meters[slug], plan.pricing_version
    else:  # the plan in force dropped the meter: the version last used
        pv = mp.levels_of or pvs[-1]
        cur = plans[pv].meters[slug]
    used = next((v.quantity for v in versions if v.pricing_version == pv), ZERO)
    return meter_usage(
        cur,
        pv,
        used,
        quantity=quantity,
        amount=amount,
        rated=rated,
        events=sum(v.events for v in versions),
        last_event_time=iso(last_ms) if last_ms > NEVER else None,
        levels=levels,
        versions=versions,
    )


def meter_usage(
    pmi: PlanMeterIndex,
    pv: str,
    used: Decimal,
    *,
    quantity: Decimal = ZERO,
    amount: Decimal = ZERO,
    rated: Decimal = ZERO,
    events: int = 0,
    last_event_time: str | None = None,
    levels: list[LevelCrossed] | None = None,
    versions: list[VersionUsage] | None = None,
) -> MeterUsage:
    """A meter's figures, the entitlement ones measured under `pmi` (the version `pv` in force)."""
    remaining, overage, has_access = access(pmi, used)
    return MeterUsage(
        meter=pmi.slug,
        currency=pmi.plan.currency,
        quantity=quantity,
        amount=amount,
        amount_rated=rated,
        pricing_version=pv,
        included=pmi.rater.included,
        used=used,
        remaining=remaining,
        overage=overage,
        hard_limit=pmi.hard_limit,
        has_access=has_access,
        events=events,
        last_event_time=last_event_time,
        levels=levels or [],
        versions=versions or [],
    )


def empty_usage(cat: CatalogIndex, tenant_id: str, plan: PlanIndex, period: Period, as_of_ms: int) -> TenantUsage:
    """A period without usage yet: every meter of the plan at zero (so a page or a client
    sees what is included before the first event)."""
    meters = {slug: meter_usage(pmi, plan.pricing_version, ZERO) for slug, pmi in plan.meters.items()}
    return TenantUsage(
        tenant_id=tenant_id,
        period=period.key,
        period_start=iso(period.start_ms),
        period_end=iso(period.end_ms),
        watermark=None,
        as_of=iso(as_of_ms),
        events=0,
        meters=meters,
    )
