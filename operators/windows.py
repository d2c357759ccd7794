"""Closing windows and rating them: each closed window of a tenant, meter, period and
pricing version becomes a rated line whose amount is the price of the period-to-date total
after it minus the price before it (so a period's lines add up exactly to the rounded price
of its total); a window reopened by late events becomes a correction (revision > 0)."""

from __future__ import annotations

from decimal import Decimal

from operators.catalog_index import CatalogIndex
from operators.engine_state import EngineConfig, Out, TenantState, WindowAcc, WKey
from operators.ids import stable_id
from operators.periods import iso
from operators.stats import Stats
from schemas.outputs import RatedUsageLine


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
        out.totals.append((Decimal(after), charged, events))
        tenant = self.cat.tenants[t.tenant_id].tenant
        currency = plan.plan.currency
        self.stats.lines += 1
        self.stats.corrections += revision > 0
        self.stats.add_amount(currency, amount)
        dims = None if cell is None else dict(zip(pmi.dimensions, cell, strict=True))
        out.lines.append(
            RatedUsageLine(
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
            )
        )

    def finalize_periods(self, t: TenantState, out: Out) -> None:
        """Forget periods past their grace: nothing can change them any more (bounded memory).
        Their final state goes out once more, for the read model's last word on them."""
        final = [k for k, mp in t.periods.items() if mp.period.end_ms + self.cfg.grace_ms <= t.watermark]
        for k in final:
            if not any(w[0] == k[0] and w[1] == k[1] for w in t.open):
                out.final.append((t.tenant_id, k, t.periods.pop(k)))
