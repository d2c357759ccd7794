"""Threshold levels: fired on every accepted event that reaches one (alerts are immediate),
once per tenant, meter, period, pricing version and level; a level with
`sustained_periods: N` fires only when it is reached in N consecutive periods."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from operators.catalog_index import CatalogIndex, Level, PlanIndex, PlanMeterIndex
from operators.engine_state import INF, MeterPeriod, Out, TenantState
from operators.ids import stable_id
from operators.periods import Period, iso
from operators.stats import Stats
from schemas.catalog import SpendThreshold
from schemas.outputs import ThresholdAlert

SPEND_METER = "*"  # the `meter` of a spend alert: the period's money over all meters


def next_limit(mp: MeterPeriod, pmi: PlanMeterIndex, pv: str) -> Decimal:
    for lv in pmi.levels:
        if (pv, lv.name) not in mp.fired:
            return lv.limit
    return INF


def fire(
    cat: CatalogIndex, stats: Stats, t: TenantState, mp: MeterPeriod, pmi: PlanMeterIndex, pv: str, ts_ms: int, event_id: str, out: Out
) -> None:
    """Fire every level that the usage under `pv` has reached, lowest first, once per period
    and version. Levels come from the plan in force at the event and are measured on the
    usage that version rates against its `included` (SPEC §2.2): after an upgrade the new
    plan's levels fire when the usage since the change reaches them, and late events dated
    before it count toward the old version's levels. `ts_ms` and `event_id`: the event that
    reached them (the crossing time and the alert's correlation id)."""
    usage = mp.usage(pv)
    for lv in pmi.levels:
        if lv.limit > usage:
            break
        if (pv, lv.name) in mp.fired:
            continue
        mp.fired.add((pv, lv.name))
        mp.crossed[(pv, lv.name)] = ts_ms
        n = lv.threshold.sustained_periods
        if n is not None and not _sustained(t, pmi.slug, lv, mp.period.idx, n):
            continue
        stats.alerts[lv.name] += 1
        tenant = cat.tenants[t.tenant_id].tenant
        out.alerts.append(
            ThresholdAlert(
                alert_id=stable_id("alert", t.tenant_id, pmi.slug, mp.period.key, pv, lv.name),
                tenant_id=t.tenant_id,
                crm_account_id=tenant.crm_account_id,
                meter=pmi.slug,
                period=mp.period.key,
                level=lv.name,
                limit=lv.limit,
                usage=Decimal(usage),
                crossed_at=iso(ts_ms),
                correlation_id=event_id,
                plan_id=pmi.plan.id,
                plan_version=pmi.plan.version,
                detected_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                destinations=list(lv.threshold.notify),
                sustained_periods=n,
                legal_entity=tenant.legal_entity,
            )
        )
    mp.next_limit = next_limit(mp, pmi, pv)


def _sustained(t: TenantState, slug: str, lv: Level, idx: int, n: int) -> bool:
    """Record that `lv` was crossed in period `idx`; true once it held n periods running."""
    hist = t.sustained.setdefault((slug, lv.name), set())
    hist.add(idx)
    for old in [p for p in hist if p <= idx - n]:
        hist.discard(old)
    return all(idx - k in hist for k in range(n))


def fire_spend(
    cat: CatalogIndex,
    stats: Stats,
    t: TenantState,
    plan: PlanIndex,
    period: Period,
    st: SpendThreshold,
    gross: Decimal,
    ts_ms: int,
    event_id: str,
    out: Out,
) -> None:
    """A spend threshold reached by the period's running gross (SPEC §9.4): one alert per
    tenant, period and amount, on no one meter (`meter` is `*`), by the event that crossed it."""
    stats.alerts[st.level] += 1
    tenant = cat.tenants[t.tenant_id].tenant
    out.alerts.append(
        ThresholdAlert(
            alert_id=stable_id("alert", t.tenant_id, SPEND_METER, period.key, st.level),
            tenant_id=t.tenant_id,
            crm_account_id=tenant.crm_account_id,
            meter=SPEND_METER,
            period=period.key,
            level=st.level,
            limit=st.amount,
            usage=gross,
            crossed_at=iso(ts_ms),
            correlation_id=event_id,
            plan_id=plan.plan.id,
            plan_version=plan.plan.version,
            detected_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            destinations=list(st.notify),
            legal_entity=tenant.legal_entity,
        )
    )
