"""Lookup structures compiled once from a validated catalog, for the per-event hot path."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from operators.aggregate import AGGREGATIONS, Agg
from operators.fees import FeeSumAgg
from operators.pricing import FeeRater, Rater, cell_price
from schemas.catalog import Catalog, CatalogError, Matrix, Meter, Percentage, PerUnit, Plan, PlanMeter, SpendThreshold, Tenant, Threshold


@dataclass(frozen=True, slots=True)
class Level:
    """A threshold resolved to an absolute limit for one plan meter."""

    name: str
    limit: Decimal
    threshold: Threshold


@dataclass(slots=True)
class MeterSpec:
    """How to read one meter's value from an event."""

    meter: Meter
    value_path: tuple[str, ...] | None
    unique_path: tuple[str, ...] | None


class _PerCell:
    """The meter-level rater of a matrix meter: there is none, each cell is priced alone."""

    included = Decimal(0)

    def charge(self, cumulative: Decimal | int) -> Decimal:
        raise TypeError("a matrix meter is priced per cell (PlanMeterIndex.amount with the cell)")


Cell = tuple[str, ...]  # a matrix meter's dimension values, in the meter's order ("" when missing)


@dataclass(slots=True)
class PlanMeterIndex:
    slug: str
    aggregation: str
    plan: Plan
    meter: PlanMeter
    rater: Rater | FeeRater | _PerCell
    levels: list[Level]  # ascending by limit: crossings fire in level order
    hard_limit: Decimal | None = None  # usage at which access closes (None: soft, overage billed)
    dimensions: tuple[str, ...] = ()  # the meter's dimension paths (matrix pricing reads them)
    matrix: Matrix | None = None
    fee_model: Percentage | None = None
    summed: bool = False  # SUM or COUNT without fees: the engine adds inline
    cells: dict[Cell, Rater | None] = field(default_factory=dict)  # a matrix meter's cells priced so far

    def level(self, name: str) -> Level | None:
        return next((lv for lv in self.levels if lv.name == name), None)

    def new_agg(self) -> Agg:
        """An empty aggregate of this plan meter (a percentage meter's sums its fees too)."""
        return FeeSumAgg(self.fee_model) if self.fee_model is not None else AGGREGATIONS[self.aggregation]()

    def cell_rater(self, cell: Cell) -> Rater | None:
        """The rater of one cell of a matrix meter: its first matching rule's unit price, or
        the default; None when neither prices it (the event is `unpriced_dimension`)."""
        r = self.cells.get(cell, False)
        if r is False:
            assert self.matrix is not None
            unit = cell_price(self.matrix, dict(zip(self.dimensions, cell, strict=True)))
            r = self.cells[cell] = None if unit is None else Rater(PerUnit(unit_price=unit), Decimal(0), self.plan.currency)
        return r  # type: ignore[return-value]

    def amount(self, agg: Agg, cell: Cell | None = None) -> Decimal:
        """The rounded charge of a period-to-date aggregate (of one cell, for a matrix meter)."""
        if self.fee_model is not None:
            return self.rater.charge(agg.fee)  # type: ignore[attr-defined]
        if cell is not None:
            r = self.cell_rater(cell)
            assert r is not None  # judged priceable before it was aggregated
            return r.charge(agg.value())
        return self.rater.charge(agg.value())


@dataclass(slots=True)
class PlanIndex:
    plan: Plan
    pricing_version: str
    meters: dict[str, PlanMeterIndex]
    billing_period: str
    spend: list[SpendThreshold] = field(default_factory=list)  # ascending by amount
    matrix: bool = False  # some meter is priced by cell (the engine caps a tenant's cells)


@dataclass(slots=True)
class TenantIndex:
    tenant: Tenant
    from_ms: int | None
    until_ms: int | None
    change_ms: list[int]  # sorted effective times of plan assignments
    plans: list[PlanIndex]
    only_plan: PlanIndex | None = None  # set when one plan covers all time: no lookup per event

    def plan_at(self, ts_ms: int) -> PlanIndex | None:
        i = bisect.bisect_right(self.change_ms, ts_ms) - 1
        return self.plans[i] if i >= 0 else None


def _ms(dt: datetime) -> int:
    return int(dt.astimezone(UTC).timestamp() * 1000)


def _path(p: str | None) -> tuple[str, ...] | None:
    return tuple(p.split(".")) if p else None


@dataclass(slots=True)
class CatalogIndex:
    catalog: Catalog
    meters_by_type: dict[str, list[MeterSpec]] = field(default_factory=dict)
    tenants: dict[str, TenantIndex] = field(default_factory=dict)
    plans_by_version: dict[str, PlanIndex] = field(default_factory=dict)

    @classmethod
    def build(cls, catalog: Catalog) -> CatalogIndex:
        idx = cls(catalog)
        for m in catalog.meters:
            idx.meters_by_type.setdefault(m.event_type, []).append(MeterSpec(m, _path(m.value_path), _path(m.unique_path)))
        by_slug = {m.slug: m for m in catalog.meters}
        plans = {p.id: _plan_index(p, by_slug) for p in catalog.plans}
        idx.plans_by_version = {p.pricing_version: p for p in plans.values()}
        for t in catalog.tenants:
            start = _ms(t.effective_from) if t.effective_from else None
            changes = sorted(
                [(start if start is not None else -(2**62), t.plan)] + [(_ms(c.effective_from), c.plan) for c in t.plan_changes]
            )
            ti = idx.tenants[t.tenant_id] = TenantIndex(
                tenant=t,
                from_ms=start,
                until_ms=_ms(t.effective_until) if t.effective_until else None,
                change_ms=[c[0] for c in changes],
                plans=[plans[c[1]] for c in changes],
            )
            if len(ti.plans) == 1 and start is None:
                ti.only_plan = ti.plans[0]
        return idx


def _plan_index(plan: Plan, meters_by_slug: dict[str, Meter]) -> PlanIndex:
    meters: dict[str, PlanMeterIndex] = {}
    for slug, pm in plan.meters.items():
        levels = sorted(
            (Level(th.level, th.absolute if th.absolute is not None else pm.included * (th.fraction or 0), th) for th in pm.thresholds),
            key=lambda lv: lv.limit,
        )
        meter = meters_by_slug[slug]
        model = pm.price
        rater: Rater | FeeRater | _PerCell
        if isinstance(model, Matrix):
            rater = _PerCell()
        elif isinstance(model, Percentage):
            rater = FeeRater(plan.currency)
        else:
            rater = Rater(model, pm.included, plan.currency)
        fee_model = model if isinstance(model, Percentage) else None
        meters[slug] = PlanMeterIndex(
            slug=slug,
            aggregation=meter.aggregation,
            plan=plan,
            meter=pm,
            rater=rater,
            levels=levels,
            hard_limit=None if pm.hard_limit is None else pm.hard_limit.absolute or pm.included * (pm.hard_limit.fraction or 0),
            dimensions=tuple(meter.dimensions) if isinstance(model, Matrix) else (),
            matrix=model if isinstance(model, Matrix) else None,
            fee_model=fee_model,
            summed=meter.aggregation in ("SUM", "COUNT") and fee_model is None,
        )
    spend = sorted(plan.spend_thresholds, key=lambda st: st.amount)
    return PlanIndex(plan, plan.pricing_version, meters, plan.billing_period, spend, any(m.matrix is not None for m in meters.values()))


def successor(old: CatalogIndex, new: Catalog) -> CatalogIndex:
    """The index for a reloaded catalog, checked against the one in use.

    A pricing version is immutable: state already rated under it must keep its meaning, so
    changing a plan means a new version, and a version that disappears from the file stays
    known (windows and periods still open under it close at its prices)."""
    idx = CatalogIndex.build(new)
    for pv, plan in idx.plans_by_version.items():
        was = old.plans_by_version.get(pv)
        if was is not None and was.plan != plan.plan:
            raise CatalogError(
                f"plans '{plan.plan.id}' version {plan.plan.version}: its content changed, but usage is already rated "
                f"under {pv}; publish the change as version {plan.plan.version + 1} and move tenants to it with plan_changes"
            )
    for pv, plan in old.plans_by_version.items():
        idx.plans_by_version.setdefault(pv, plan)
    gone = sorted(set(old.tenants) - set(idx.tenants))
    if gone:
        raise CatalogError(
            f"tenants: {', '.join(gone[:5])}{' …' if len(gone) > 5 else ''} removed, but their usage may still be open; "
            "keep them and set effective_until to offboard them"
        )
    return idx
