"""Closing windows and rating them: each closed window of a tenant, meter, period and
pricing version becomes a rated line whose amount is the price of the period-to-date total
after it minus the price before it (so a period's lines add up exactly to the rounded price
of its total); a window reopened by late events becomes a correction (revision > 0)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from operators import credits, review
from operators.catalog_index import CatalogIndex
from operators.credits import Cell, CreditsToken
from operators.engine_state import EngineConfig, MeterPeriod, Out, TenantState, WindowAcc, WKey
from operators.ids import stable_id
from operators.periods import Period, iso, period_of
from operators.stats import Stats
from schemas.catalog import Plan
from schemas.outputs import RatedUsageLine, ThresholdAlert

ZERO = Decimal(0)
MINIMUM_METER = "minimum"  # the `meter` of a minimum commitment's true-up line
CREDITS_METER = "credits"  # the `meter` of a credit threshold alert


def line_id(
    tenant_id: str, meter: str, window_start_ms: int | str, pv: str, revision: int, cell: tuple[str, ...] | None, *more: object
) -> str:
    """A rated line's id: tenant, meter, window, pricing version, revision (and a matrix
    meter's cell: each cell has its own lines; a plain meter's ids are as they always were)."""
    if cell is None:
        return stable_id("line", tenant_id, meter, window_start_ms, pv, revision, *more)
    return stable_id("line", tenant_id, meter, window_start_ms, pv, revision, *more, "cell", *cell)


def _order(k: WKey) -> tuple[int, str, tuple[str, ...]]:
    """Windows close by window start, then meter, then cell (SPEC §9.8): a fixed order, so a
    replay emits what the first run did."""
    return (k[3], k[0], k[4] if len(k) > 4 else ())


class Windows:
    def __init__(self, cat: CatalogIndex, cfg: EngineConfig, stats: Stats) -> None:
        self.cat, self.cfg, self.stats = cat, cfg, stats

    def close(self, t: TenantState, cutoff: int, out: Out) -> None:
        t.hot.clear()
        due = sorted((k for k, w in t.open.items() if w.end_ms <= cutoff), key=_order)
        for k in due:
            self.emit(t, k, t.open.pop(k), 0, out)
        self.stats.open_windows -= len(due)
        if cutoff > t.closed_through:
            t.closed_through = cutoff

    def corrections(self, t: TenantState, out: Out) -> None:
        t.hot.clear()
        for k in sorted(t.pending, key=_order):
            mp = t.periods[(k[0], k[1])]
            mp.correction_seq += 1
            self.emit(t, k, t.pending[k], mp.correction_seq, out)
        t.pending.clear()

    def emit(self, t: TenantState, k: WKey, acc: WindowAcc, revision: int, out: Out) -> None:
        slug, pidx, pv = k[0], k[1], k[2]
        cell = k[4] if len(k) > 4 else None  # a matrix meter's window: rated on its cell's totals
        mp = t.periods[(slug, pidx)]
        plan = self.cat.plans_by_version[pv]
        pmi = plan.meters[slug]
        totals = mp if cell is None else mp.cells[cell]
        closed = totals.closed.get(pv)
        if closed is None:
            closed = totals.closed[pv] = pmi.new_agg()
        before = closed.value()
        charged_before = pmi.amount(closed, cell)
        closed.merge(acc.agg)
        after = closed.value()
        charged = pmi.amount(closed, cell)
        amount = charged - charged_before
        counts = getattr(totals, "closed_events", None)  # absent in snapshots of earlier versions
        if counts is None:
            counts = mp.closed_events = {}
        events = counts[pv] = counts.get(pv, 0) + acc.count
        if cell is not None:  # the meter's own closed totals hold all its cells (the read model's figures)
            whole = mp.closed.get(pv)
            if whole is None:
                whole = mp.closed[pv] = pmi.new_agg()
            whole.merge(acc.agg)
            mp.closed_events[pv] = mp.closed_events.get(pv, 0) + acc.count
        if acc.last_ms > mp.last_ms:
            mp.last_ms = acc.last_ms
        tenant = self.cat.tenants[t.tenant_id].tenant
        currency = plan.plan.currency
        self.stats.lines += 1
        self.stats.corrections += revision > 0
        self.stats.add_amount(currency, amount)
        dims = None if cell is None else dict(zip(pmi.dimensions, cell, strict=True))
        ln = RatedUsageLine(
            line_id=line_id(t.tenant_id, slug, acc.start_ms, pv, revision, cell),
            tenant_id=t.tenant_id,
            erp_customer_id=tenant.erp_customer_id,
            contract_id=tenant.contract_id,
            product_code=pmi.meter.product_code,
            meter=slug,
            quantity=Decimal(after - before),
            amount=amount,
            currency=currency,
            window_start=iso(acc.start_ms),
            window_end=iso(acc.end_ms),
            period=mp.period.key,
            pricing_version=pv,
            event_count=acc.count,
            first_event_time=iso(acc.first_ms),
            last_event_time=iso(acc.last_ms),
            revision=revision,
            dimensions=dims,
            legal_entity=tenant.legal_entity,
        )
        self._emit(t, ln, Decimal(after), charged, events, acc.start_ms, cell, plan.plan, mp.period, out)

    def _emit(
        self,
        t: TenantState,
        ln: RatedUsageLine,
        qty: Decimal,
        charged: Decimal,
        events: int,
        at_ms: int,
        cell: Cell,
        plan: Plan,
        period: Period,
        out: Out,
        any_meter: bool = False,
    ) -> None:
        """A line goes out with its key's period-to-date totals; with the tenant's grants, it
        draws on them (or gives back) first, and the register settles its credits too. The
        review rules (operators/review.py) may hold it, and its draws, for a person."""
        emitted = getattr(t, "emitted", None)  # absent in snapshots of earlier versions
        if emitted is None:
            emitted = t.emitted = {}
        previous = emitted.get(period_of(period.start_ms - 1, plan.billing_period).key)
        gross = review.add_gross(emitted, period.key, ln.amount)
        why = review.hold_reason(
            self.cat.catalog.review, self.cat.tenants[t.tenant_id].tenant.review, ln.amount, ln.currency, gross, previous
        )
        held = getattr(t, "held", None)  # absent in snapshots of earlier versions
        if held is None:
            held = t.held = {}
        if why is not None or (held and ln.revision):
            why = review.hold_correction(held, period.key, (ln.meter, ln.pricing_version, at_ms, cell), ln.revision, why)
        if why is not None:
            ln.review = why
        token: CreditsToken = ()
        if t.credits is not None:
            token = credits.apply(t.credits, ln, at_ms, cell, any_meter=any_meter)
            if ln.credits:
                self._credit_levels(t, ln, plan, at_ms, out)
        out.totals.append((qty, charged, events, token))
        out.lines.append(ln)

    def _credit_levels(self, t: TenantState, ln: RatedUsageLine, plan: Plan, at_ms: int, out: Out) -> None:
        """Plan credit_thresholds (default 80 % and 100 % of a grant used): once per grant and level."""
        assert t.credits is not None
        for use in ln.credits or ():
            g = t.credits.grants[use.grant_id]
            for f in plan.credit_thresholds:
                level = f"credit:{(f * 100).normalize():f}%"
                if level in g.fired or g.used < g.amount * f:
                    continue
                g.fired.add(level)
                self.stats.alerts[level] += 1
                tenant = self.cat.tenants[t.tenant_id].tenant
                out.alerts.append(
                    ThresholdAlert(
                        alert_id=stable_id("alert", t.tenant_id, CREDITS_METER, g.grant_id, level),
                        tenant_id=t.tenant_id,
                        crm_account_id=tenant.crm_account_id,
                        meter=CREDITS_METER,
                        period=ln.period,
                        level=level,
                        limit=g.amount * f,
                        usage=g.used,
                        crossed_at=iso(at_ms),
                        correlation_id=ln.line_id,
                        plan_id=plan.id,
                        plan_version=plan.version,
                        detected_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                        destinations=["crm", "success"],
                        grant_id=g.grant_id,
                        legal_entity=tenant.legal_entity,
                    )
                )

    def finalize_periods(self, t: TenantState, out: Out) -> None:
        """Forget periods past their grace: nothing can change them any more (bounded memory).
        Their final state goes out once more, for the read model's last word on them."""
        final = [k for k, mp in t.periods.items() if mp.period.end_ms + self.cfg.grace_ms <= t.watermark]
        closing: dict[str, Period] = {}
        for k in final:
            if not any(w[0] == k[0] and w[1] == k[1] for w in t.open):
                mp = t.periods.pop(k)
                out.final.append((t.tenant_id, k, mp))
                t.gross[mp.period.key] = t.gross.get(mp.period.key, ZERO) + self._gross(k[0], mp)
                closing[mp.period.key] = mp.period
        for key, period in sorted(closing.items()):
            if any(mp.period.key == key for mp in t.periods.values()):
                continue  # a meter of it still has an open window: the period closes with the last
            self._true_up(t, period, t.gross.pop(key), out)
            held = getattr(t, "held", None)  # absent in snapshots of earlier versions
            if held:
                held.pop(key, None)  # final: no correction of its held windows can come

    def _gross(self, slug: str, mp: MeterPeriod) -> Decimal:
        """What a meter's period was rated in all (closed windows, all versions and cells)."""
        total = ZERO
        for pv, agg in mp.closed.items():
            pmi = self.cat.plans_by_version[pv].meters[slug]
            if pmi.matrix is None:
                total += pmi.amount(agg)
        for cell, ct in mp.cells.items():
            for pv, agg in ct.closed.items():
                total += self.cat.plans_by_version[pv].meters[slug].amount(agg, cell)
        return total

    def _true_up(self, t: TenantState, period: Period, gross: Decimal, out: Out) -> None:
        """A period closed for late events below its plan's minimum (the version in force at
        its end; SPEC §9.6): one `minimum_true_up` line of the difference. The register keeps
        it once across restarts (a replay re-derives it, equal)."""
        ti = self.cat.tenants[t.tenant_id]
        plan = ti.only_plan or ti.plan_at(period.end_ms - 1)
        if plan is None or plan.plan.minimum is None or gross >= plan.plan.minimum.amount:
            return
        minimum = plan.plan.minimum
        amount = minimum.amount - gross
        t.true_ups[period.key] = (plan.pricing_version, amount, period.end_ms)
        self.stats.lines += 1
        self.stats.add_amount(plan.plan.currency, amount)
        ln = RatedUsageLine(
            line_id=line_id(t.tenant_id, MINIMUM_METER, period.start_ms, plan.pricing_version, 0, None),
            tenant_id=t.tenant_id,
            erp_customer_id=ti.tenant.erp_customer_id,
            contract_id=ti.tenant.contract_id,
            product_code=minimum.product_code,
            meter=MINIMUM_METER,
            quantity=Decimal(1),
            amount=amount,
            currency=plan.plan.currency,
            window_start=iso(period.start_ms),
            window_end=iso(period.end_ms),
            period=period.key,
            pricing_version=plan.pricing_version,
            event_count=0,
            first_event_time=iso(period.end_ms),
            last_event_time=iso(period.end_ms),
            revision=0,
            kind="minimum_true_up",
            legal_entity=ti.tenant.legal_entity,
        )
        self._emit(t, ln, Decimal(1), amount, 0, period.end_ms, None, plan.plan, period, out, any_meter=True)
