"""The read model: what a tenant has used and owes so far in each billing period.

The rating dataflow writes `facts` (from the engine's own state: quantities per pricing
version, event counts, crossing times, the watermark) and the API `derive`s the figures
(amounts, included, remaining, access) with the same raters rating uses; pricing versions
are immutable, so the derivation cannot drift from what was billed, and the write stays
cheap (it runs for every touched tenant, every interval).

Built from absolute period-to-date state, never from deltas, so writing it again after a
crash replay writes the same values; `records` (the tenant's input records that reached
rating, however each was judged: a position along the input) lets the store refuse a write
from further back than the one it holds, and take the replay's state once the replay is as
far, even where it judged differently. Once the input is drained every window is closed,
and `quantity` and `amount` are exactly what `tallyflow reconcile` recounts (the sum of the
period's rated lines).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from decimal import Decimal

from operators.catalog_index import CatalogIndex, PlanIndex, PlanMeterIndex
from operators.engine_state import MeterPeriod, TenantState
from operators.periods import Period, iso
from operators.windows import MINIMUM_METER
from schemas.usage import (
    CellFacts,
    CellUsage,
    Entitlement,
    GrantBalance,
    GrantFacts,
    LevelCrossed,
    LevelFacts,
    MeterFacts,
    MeterUsage,
    TenantUsage,
    UsageFacts,
    VersionFacts,
    VersionUsage,
)

ZERO = Decimal(0)
NEVER = -(2**62)


def access(pmi: PlanMeterIndex, used: Decimal) -> tuple[Decimal, Decimal, bool]:
    """(remaining, overage, has_access) of `used` under one plan meter: access closes at the
    hard limit, and stays open without one (overage is billed)."""
    included = pmi.rater.included
    return max(included - used, ZERO), max(used - included, ZERO), pmi.hard_limit is None or used < pmi.hard_limit


def entitlement(
    tenant_id: str,
    period: str,
    pmi: PlanMeterIndex,
    pv: str,
    used: Decimal,
    as_of: str,
    watermark: str | None,
    credits_left: Decimal = ZERO,
) -> Entitlement:
    """May the tenant use the meter: `used` measured under the plan meter in force;
    `credits_left` what its live grants still cover of it (`credits_remaining`)."""
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
        currency=m.currency,
        credits_remaining=credits_left,
    )


def plan_in_force(cat: CatalogIndex, tenant_id: str, ts_ms: int) -> PlanIndex | None:
    ti = cat.tenants.get(tenant_id)
    if ti is None:
        return None
    return ti.only_plan or ti.plan_at(ts_ms)


# Levels crossed per (tenant, meter, period idx), with the number of fired levels they were
# built from: fired levels only grow, and rarely, so a caller that writes often keeps them.
LevelsCache = dict[tuple[str, str, int], tuple[int, list[LevelFacts]]]


class UnknownVersion(Exception):
    """Facts name a pricing version this catalog does not know (yet: a reload is due)."""


def facts(
    t: TenantState, as_of_ms: int, final: Iterable[tuple[tuple[str, int], MeterPeriod]] = (), levels_cache: LevelsCache | None = None
) -> list[UsageFacts]:
    """What the read model stores for a tenant: one `UsageFacts` per billing period it has
    state for, and per period in `final` (forgotten by the engine since the last write: all of
    a period's meters are forgotten together, once its grace has passed). Runs for every
    touched tenant at every write, in the worker: quantities and counts only, no pricing and
    no catalog (`derive` does that where the figures are read)."""
    events: dict[tuple[str, int, str], int] = {}  # in open and pending windows, per pricing version
    cell_events: dict[tuple[str, int, str, tuple[str, ...]], int] = {}  # the same per matrix cell
    last: dict[tuple[str, int], int] = {}
    for windows in (t.open, t.pending):
        for k, acc in windows.items():
            slug, idx, pv = k[0], k[1], k[2]
            events[(slug, idx, pv)] = events.get((slug, idx, pv), 0) + acc.count
            if len(k) > 4:
                ck = (slug, idx, pv, k[4])
                cell_events[ck] = cell_events.get(ck, 0) + acc.count
            if acc.last_ms > last.get((slug, idx), NEVER):
                last[(slug, idx)] = acc.last_ms
    docs: dict[str, UsageFacts] = {}
    for (slug, idx), mp in itertools.chain(t.periods.items(), final):
        p = mp.period
        doc = docs.get(p.key)
        if doc is None:
            doc = docs[p.key] = UsageFacts(t.tenant_id, p.key, p.kind, p.start_ms, p.end_ms, t.watermark, as_of_ms, 0, [], t.records)
        live_by, closed_by = mp.live, mp.closed
        versions: list[VersionFacts] = []
        for pv in live_by if closed_by.keys() <= live_by.keys() else sorted({*live_by, *closed_by}):
            live, closed = live_by.get(pv), closed_by.get(pv)
            n = mp.closed_events.get(pv, 0) + events.get((slug, idx, pv), 0)
            q = ZERO if live is None else Decimal(live.value())
            vf = VersionFacts(pv, q, ZERO if closed is None else Decimal(closed.value()), n)
            fee = getattr(live, "fee", None)
            if fee is not None:  # a percentage meter: its amount is its fees', not its quantity's
                vf.fee, vf.rated_fee = fee, getattr(closed, "fee", ZERO)
            versions.append(vf)
            doc.events += n
        if not versions:
            continue
        levels: list[LevelFacts] | None = None
        if levels_cache is not None:
            hit = levels_cache.get((t.tenant_id, slug, idx))
            if hit is not None and hit[0] == len(mp.fired):
                levels = hit[1]
        if levels is None:
            levels = [LevelFacts(lpv, name, mp.crossed.get((lpv, name))) for lpv, name in sorted(mp.fired)]
            if levels_cache is not None:
                levels_cache[(t.tenant_id, slug, idx)] = (len(mp.fired), levels)
        last_ms = max(mp.last_ms, last.get((slug, idx), NEVER))
        cells = [
            CellFacts(
                list(cell),
                pv,
                Decimal(live.value()),
                Decimal(ct.closed[pv].value()) if pv in ct.closed else ZERO,
                ct.closed_events.get(pv, 0) + cell_events.get((slug, idx, pv, cell), 0),
            )
            for cell, ct in mp.cells.items()
            for pv, live in ct.live.items()
        ]
        doc.meters.append(MeterFacts(slug, last_ms if last_ms > NEVER else None, versions, levels, cells))
    if t.credits is not None and docs:
        grants = [
            GrantFacts(
                g.grant_id, g.amount, g.currency, g.priority, g.effective_ms, g.expires_ms,
                None if g.meters is None else sorted(g.meters), g.drawn, g.returned, g.expired, g.voided, g.status,
            )
            for g in t.credits.grants.values()
        ]  # fmt: skip
        for doc in docs.values():
            doc.grants = grants
    for key, (pv, amount, _) in t.true_ups.items():
        doc = docs.get(key)
        if doc is not None:
            doc.true_up_version, doc.true_up = pv, amount
    return list(docs.values())


def derive(cat: CatalogIndex, f: UsageFacts) -> TenantUsage:
    """The figures people and services read, from the facts: amounts priced by each
    version's rater (as rating prices them), and included / used / remaining / access
    under the plan in force at the tenant's watermark within the period."""
    plans = cat.plans_by_version
    plan = plan_in_force(cat, f.tenant_id, min(max(f.watermark_ms, f.start_ms), f.end_ms - 1))
    start, end = _bounds(f.start_ms, f.end_ms)
    meters: dict[str, MeterUsage] = {}
    for m in f.meters:
        versions: list[VersionUsage] = []
        quantity = amount = rated = ZERO
        for v in m.versions:
            pi = plans.get(v.pricing_version)
            if pi is None:
                raise UnknownVersion(f"pricing version {v.pricing_version} is not in the catalog loaded here")
            pmi = pi.meters[m.meter]
            if pmi.matrix is not None:  # priced cell by cell, below
                a = ar = ZERO
            elif v.fee is not None:  # percentage: the rounded fees
                a, ar = pmi.rater.charge(v.fee), pmi.rater.charge(v.rated_fee or ZERO)
            else:
                a = pmi.rater.charge(v.quantity)
                ar = a if v.rated_quantity == v.quantity else pmi.rater.charge(v.rated_quantity)
            quantity, amount, rated = quantity + v.quantity, amount + a, rated + ar
            versions.append(
                VersionUsage(
                    pricing_version=v.pricing_version,
                    plan_id=pmi.plan.id,
                    plan_version=pmi.plan.version,
                    quantity=v.quantity,
                    included=pmi.rater.included,
                    amount=a,
                    amount_rated=ar,
                    events=v.events,
                )
            )
        cells: list[CellUsage] = []
        for c in m.cells:
            pmi = plans[c.pricing_version].meters[m.meter]
            cell = tuple(c.cell)
            rater = pmi.cell_rater(cell)
            if rater is None:  # priced when it was accepted: a catalog that lost its price is a stale one
                raise UnknownVersion(f"pricing version {c.pricing_version} no longer prices cell {cell} of {m.meter}")
            ca, car = rater.charge(c.quantity), rater.charge(c.rated_quantity)
            amount, rated = amount + ca, rated + car
            for vu in versions:
                if vu.pricing_version == c.pricing_version:
                    vu.amount, vu.amount_rated = vu.amount + ca, vu.amount_rated + car
            dims = dict(zip(pmi.dimensions, cell, strict=True))
            cells.append(
                CellUsage(
                    dimensions=dims, pricing_version=c.pricing_version, quantity=c.quantity, amount=ca, amount_rated=car, events=c.events
                )
            )
        if plan is not None and m.meter in plan.meters:
            cur, pv = plan.meters[m.meter], plan.pricing_version
        else:  # the plan in force dropped the meter: the version last used
            pv = m.versions[-1].pricing_version
            cur = plans[pv].meters[m.meter]
        levels: list[LevelCrossed] = []
        for lf in m.levels:
            lv = plans[lf.pricing_version].meters[m.meter].level(lf.level) if lf.pricing_version in plans else None
            if lv is not None:
                at = None if lf.crossed_ms is None else iso(lf.crossed_ms)
                levels.append(LevelCrossed(level=lf.level, limit=lv.limit, pricing_version=lf.pricing_version, crossed_at=at))
        levels.sort(key=lambda lv: (lv.pricing_version, lv.limit, lv.level))
        meters[m.meter] = meter_usage(
            cur,
            pv,
            next((v.quantity for v in versions if v.pricing_version == pv), ZERO),
            quantity=quantity,
            amount=amount,
            rated=rated,
            events=sum(v.events for v in versions),
            last_event_time=None if m.last_ms is None else iso(m.last_ms),
            levels=levels,
            versions=versions,
            cells=cells,
        )
    if f.true_up is not None and f.true_up_version in plans:
        pi = plans[f.true_up_version]
        meters[MINIMUM_METER] = MeterUsage(
            meter=MINIMUM_METER,
            currency=pi.plan.currency,
            quantity=Decimal(1),
            amount=f.true_up,
            amount_rated=f.true_up,
            pricing_version=f.true_up_version,
            included=ZERO,
            used=ZERO,
            remaining=ZERO,
            overage=ZERO,
            hard_limit=None,
            has_access=True,
            events=0,
            last_event_time=None,
            levels=[],
            versions=[
                VersionUsage(
                    pricing_version=f.true_up_version,
                    plan_id=pi.plan.id,
                    plan_version=pi.plan.version,
                    quantity=Decimal(1),
                    included=ZERO,
                    amount=f.true_up,
                    amount_rated=f.true_up,
                    events=0,
                )
            ],
        )
    return TenantUsage(
        tenant_id=f.tenant_id,
        period=f.period,
        period_start=start,
        period_end=end,
        watermark=iso(f.watermark_ms),
        as_of=iso(f.as_of_ms),
        events=f.events,
        meters=meters,
        credits=balances(f),
    )


def tenant_usage(
    cat: CatalogIndex,
    t: TenantState,
    as_of_ms: int,
    final: Iterable[tuple[tuple[str, int], MeterPeriod]] = (),
) -> list[TenantUsage]:
    """`derive(facts(...))`: a tenant's figures straight from engine state."""
    return [derive(cat, f) for f in facts(t, as_of_ms, final)]


@functools.lru_cache(maxsize=256)
def _bounds(start_ms: int, end_ms: int) -> tuple[str, str]:
    return iso(start_ms), iso(end_ms)


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
    cells: list[CellUsage] | None = None,
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
        cells=cells or [],
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


def balances(f: UsageFacts) -> list[GrantBalance]:
    """The tenant's grants as people and services read them (the credits API, the page)."""
    return [
        GrantBalance(
            grant_id=g.grant_id,
            currency=g.currency,
            granted=g.amount,
            used=g.drawn - g.returned,
            expired=g.expired,
            voided=g.voided,
            remaining=g.amount - g.drawn + g.returned - g.expired - g.voided,
            priority=g.priority,
            effective_at=iso(g.effective_ms),
            expires_at=None if g.expires_ms is None else iso(g.expires_ms),
            meters=g.meters,
            status=g.status,
        )
        for g in f.grants
    ]


def credits_remaining(f: UsageFacts, meter: str, currency: str, at_ms: int) -> Decimal:
    """What the tenant's live grants still cover of `meter` in `currency` at `at_ms` (the
    entitlement answer's `credits_remaining`)."""
    return sum(
        (
            g.amount - g.drawn + g.returned - g.expired - g.voided
            for g in f.grants
            if g.status == "active"
            and g.currency == currency
            and (g.meters is None or meter in g.meters)
            and g.effective_ms <= at_ms
            and (g.expires_ms is None or at_ms < g.expires_ms)
        ),
        ZERO,
    )
