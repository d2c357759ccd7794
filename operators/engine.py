"""The per-shard engine: dedup, lateness, thresholds, tumbling windows, rating.

One engine owns a fixed shard of tenants, so all of a tenant's state lives in one place
and the dataflow can hand it whole batches. Thresholds are checked on every accepted
event (alerts are immediate); windows close when the tenant's watermark passes them or
the tenant has been quiet for `idle_timeout`; an event for a window already closed is a
correction (signed delta, revision > 0) until its billing period's grace has passed, and a
`too_late` dead letter after that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from operators.aggregate import AGGREGATIONS, Agg
from operators.catalog_index import CatalogIndex, Level, PlanMeterIndex
from operators.deadletters import dead_letter, internal_error
from operators.dedup import GenerationalDedup
from operators.ids import stable_id
from operators.periods import Period, PeriodCache, iso
from operators.stats import Stats
from schemas.outputs import DeadLetter, RatedUsageLine, ThresholdAlert
from schemas.records import Accepted

_INF = Decimal("Infinity")


class Backstop(Protocol):
    """Long-horizon dedup behind the in-memory window (state.dedup_store.DedupStore)."""

    def duplicates(self, events: Sequence[Accepted]) -> set[int]:
        """Indices of events seen before; records the others."""
        ...

    def record(self, events: Sequence[Accepted]) -> None:
        """Remember accepted events (may be asynchronous)."""
        ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    window_ms: int = 60_000
    allowed_lateness_ms: int = 0  # windows close at watermark - lateness
    grace_ms: int = 3_600_000  # corrections accepted until period end + grace
    dedup_horizon_ms: int = 3_600_000
    idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.window_ms <= 0:
            raise ValueError("window must be positive")
        if self.grace_ms < self.allowed_lateness_ms:
            raise ValueError("grace must be at least the allowed lateness, or windows could close after their period is final")


@dataclass(slots=True)
class WindowAcc:
    agg: Agg
    start_ms: int
    end_ms: int
    count: int = 0
    first_ms: int = 2**62
    last_ms: int = -(2**62)

    def add(self, v: Any, ts: int) -> None:
        self.agg.add(v, ts)
        self.count += 1
        if ts < self.first_ms:
            self.first_ms = ts
        if ts > self.last_ms:
            self.last_ms = ts


@dataclass(slots=True)
class MeterPeriod:
    """Period-to-date state of one tenant meter: live total for thresholds, closed totals per
    pricing version for rating."""

    period: Period
    live: Agg
    closed: dict[str, Agg] = field(default_factory=dict)
    closed_events: dict[str, int] = field(default_factory=dict)  # per pricing version
    fired: set[tuple[str, str]] = field(default_factory=set)  # (pricing version, level)
    next_limit: Decimal = _INF
    levels_of: str = ""  # pricing version that next_limit was computed for
    correction_seq: int = 0


@dataclass(slots=True)
class Slot:
    """Where a meter's recent events went; consecutive events of a tenant mostly share it."""

    pv: str
    ws: int
    late: bool
    summed: bool  # SUM or COUNT: updated inline on the hot path
    mp: MeterPeriod
    acc: WindowAcc


# window key: (meter slug, period idx, pricing version, window start)
WKey = tuple[str, int, str, int]


@dataclass(slots=True)
class TenantState:
    tenant_id: str
    dedup: GenerationalDedup
    watermark: int = -(2**62)
    closed_through: int = -(2**62)
    last_wall: float = 0.0
    periods: dict[tuple[str, int], MeterPeriod] = field(default_factory=dict)
    open: dict[WKey, WindowAcc] = field(default_factory=dict)
    pending: dict[WKey, WindowAcc] = field(default_factory=dict)
    sustained: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    next_due: int = -(2**62)  # watermark at which windows, periods or dedup need attention
    hot: dict[str, Slot] = field(default_factory=dict)  # per meter: the slot the last event used


@dataclass(slots=True)
class Out:
    alerts: list[ThresholdAlert] = field(default_factory=list)
    lines: list[RatedUsageLine] = field(default_factory=list)
    # Per line: the period-to-date (quantity, amount, events) of its tenant, meter, period
    # and pricing version after it, so an emission register can settle replays by difference.
    totals: list[tuple[Decimal, Decimal, int]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


class ShardEngine:
    def __init__(self, catalog: CatalogIndex, cfg: EngineConfig, stats: Stats, backstop: Backstop | None = None) -> None:
        self.cat = catalog
        self.cfg = cfg
        self.stats = stats
        self.backstop = backstop
        self.tenants: dict[str, TenantState] = {}
        self._periods = PeriodCache()
        self._deadline: float | None = None
        self._deadline_known = False

    # -- recovery ----------------------------------------------------------------------
    def state(self) -> dict[str, TenantState]:
        """What must survive a restart; catalog and counters are rebuilt, not snapshotted."""
        return self.tenants

    @classmethod
    def resume(
        cls, catalog: CatalogIndex, cfg: EngineConfig, stats: Stats, state: dict[str, TenantState] | None, backstop: Backstop | None = None
    ) -> ShardEngine:
        eng = cls(catalog, cfg, stats, backstop)
        if state:
            eng.tenants = state
        return eng

    # -- hot path ----------------------------------------------------------------------
    def _ask_backstop(self, batch: list[Accepted], backstop: Backstop) -> None:
        """Mark events memory cannot judge: a copy that memory no longer holds is at least a
        horizon older than its tenant's watermark, and a tenant new to this process has no
        memory at all."""
        horizon, tenants = self.cfg.dedup_horizon_ms, self.tenants
        ask = []
        for ev in batch:
            t = tenants.get(ev.tenant_id)
            if t is None or ev.ts_ms <= t.watermark - horizon:
                ask.append(ev)
        if ask:
            for i in backstop.duplicates(ask):
                ask[i].seen = True
            for ev in ask:
                ev.asked = True

    def process(self, batch: list[Accepted], now: float, received_at: str) -> Out:
        """Apply a shard's sub-batch. A failure of ours on one event (a bug: every bound was
        checked by the validator) dead-letters that event as `internal_error` and the batch
        goes on after it; one try per batch, not per event."""
        out = Out()
        backstop = self.backstop
        fresh: list[Accepted] | None = None
        if backstop is not None:
            self._ask_backstop(batch, backstop)
            fresh = []
        due: dict[str, TenantState] = {}
        start = 0
        while start < len(batch):
            failed = self._apply(batch, start, now, received_at, out, due, fresh)
            if failed is None:
                break
            i, exc = failed
            ev = batch[i]
            why = internal_error(exc, "rating an event", tenant_id=ev.tenant_id, offset=ev.offset)
            self.stats.dead["internal_error"] += 1
            out.dead.append(
                dead_letter(
                    "internal_error", why, ev.payload, ev.topic, ev.partition, ev.offset, received_at, ev.index, ev.event_id, ev.tenant_id
                )
            )
            start = i + 1
        if fresh and backstop is not None:
            backstop.record(fresh)
        for t in due.values():
            self._guard_tenant(t, self._maintain, out)
        return out

    def _guard_tenant(self, t: TenantState, fn: Callable[[TenantState, Out], None], out: Out) -> None:
        """Tenant-level work (closing windows, rating): a failure of ours stays with its tenant."""
        try:
            fn(t, out)
        except Exception as e:
            internal_error(e, f"maintaining tenant {t.tenant_id}", tenant_id=t.tenant_id)

    def _apply(
        self,
        batch: list[Accepted],
        start: int,
        now: float,
        received_at: str,
        out: Out,
        due: dict[str, TenantState],
        fresh: list[Accepted] | None,
    ) -> tuple[int, Exception] | None:
        """The hot loop from `start`; returns the index and error of an event that failed."""
        cfg = self.cfg
        W, grace = cfg.window_ms, cfg.grace_ms
        tenants, plans = self.tenants, self.cat.plans_by_version
        # The current period and pricing version change rarely within a batch: keep them
        # in locals and recompute only when an event falls outside.
        p_start = p_end = final = 0
        p_kind = ""
        period: Period | None = None
        pv = ""
        plan = None
        accepted = duplicates = 0
        ev = batch[start]
        try:
            for ev in batch[start:] if start else batch:
                tid = ev.tenant_id
                t = tenants.get(tid)
                if t is None:
                    t = tenants[tid] = TenantState(tid, GenerationalDedup(cfg.dedup_horizon_ms))
                ts = ev.ts_ms
                if ev.pricing_version != pv:
                    pv = ev.pricing_version
                    plan = plans[pv]
                assert plan is not None
                if not (p_start <= ts < p_end) or p_kind != plan.billing_period:
                    period = self._periods.get(ts, plan.billing_period)
                    p_start, p_end, p_kind, final = period.start_ms, period.end_ms, period.kind, period.end_ms + grace
                assert period is not None
                if final <= t.watermark:
                    self._too_late(t, ev, period, received_at, out)
                    continue
                d = t.dedup
                key = ev.key
                if key in d.cur or key in d.prev or ev.seen:
                    duplicates += 1
                    continue
                d.cur.add(key)
                if fresh is not None and not ev.asked:
                    fresh.append(ev)
                t.last_wall = now
                if ts > t.watermark:
                    t.watermark = ts
                    if ts >= t.next_due:
                        due[tid] = t
                ws = ts - ts % W
                if ws < p_start:
                    ws = p_start
                # A hot slot is valid while its window start and pricing version match: a
                # window start names one period, and closing windows clears the slots.
                for slug, v in ev.values:
                    slot = t.hot.get(slug)
                    if slot is None or slot.ws != ws or slot.pv != pv:
                        slot = self._slot(t, plan.meters[slug], period, pv, ws)
                        if slot.late:
                            due[tid] = t  # its correction goes out with this batch
                    mp = slot.mp
                    acc = slot.acc
                    if slot.summed:
                        live = mp.live.v = mp.live.v + v  # type: ignore[attr-defined]
                        acc.agg.v += v  # type: ignore[attr-defined]
                    else:
                        mp.live.add(v, ts)
                        live = mp.live.value()
                        acc.agg.add(v, ts)
                    if live >= mp.next_limit:
                        self._thresholds(t, mp, plan.meters[slug], pv, ev, out)
                    acc.count += 1
                    if ts < acc.first_ms:
                        acc.first_ms = ts
                    if ts > acc.last_ms:
                        acc.last_ms = ts
                accepted += 1  # last: an event that failed above is not counted as accepted
        except Exception as e:
            return next(i for i in range(start, len(batch)) if batch[i] is ev), e
        finally:
            self.stats.accepted += accepted
            self.stats.duplicates += duplicates
        return None

    def _slot(self, t: TenantState, pmi: PlanMeterIndex, period: Period, pv: str, ws: int) -> Slot:
        """Find or open the window (and period state) an event belongs to; cache it as hot."""
        mk = (pmi.slug, period.idx)
        mp = t.periods.get(mk)
        if mp is None:
            mp = t.periods[mk] = MeterPeriod(period, AGGREGATIONS[pmi.aggregation]())
            t.next_due = min(t.next_due, period.end_ms + self.cfg.grace_ms)
        if mp.levels_of != pv:
            mp.levels_of = pv
            mp.next_limit = self._next_limit(mp, pmi, pv)
        we = min(ws - ws % self.cfg.window_ms + self.cfg.window_ms, period.end_ms)
        late = we <= t.closed_through
        wk = (pmi.slug, period.idx, pv, ws)
        windows = t.pending if late else t.open
        acc = windows.get(wk)
        if acc is None:
            acc = windows[wk] = WindowAcc(AGGREGATIONS[pmi.aggregation](), ws, we)
            if not late:
                self._deadline_known = False
                self.stats.open_windows += 1
                t.next_due = min(t.next_due, we + self.cfg.allowed_lateness_ms)
        slot = t.hot[pmi.slug] = Slot(pv, ws, late, pmi.aggregation in ("SUM", "COUNT"), mp, acc)
        return slot

    def _maintain(self, t: TenantState, out: Out) -> None:
        """Work due when a tenant's watermark passes a window end or a period's grace."""
        t.dedup.advance(t.watermark)
        self._close(t, t.watermark - self.cfg.allowed_lateness_ms, out)
        if t.pending:
            self._corrections(t, out)
        self._finalize_periods(t)
        t.hot.clear()
        lateness = self.cfg.allowed_lateness_ms
        due = [w.end_ms + lateness for w in t.open.values()]
        due += [mp.period.end_ms + self.cfg.grace_ms for mp in t.periods.values()]
        due.append(t.dedup.next_rotation())
        t.next_due = min(due)

    def _too_late(self, t: TenantState, ev: Accepted, period: Period, received_at: str, out: Out) -> None:
        self.stats.dead["too_late"] += 1
        final = period.end_ms + self.cfg.grace_ms
        why = f"event time {iso(ev.ts_ms)} is in period {period.key}, final since {iso(final)}; tenant watermark is {iso(t.watermark)}"
        out.dead.append(
            dead_letter("too_late", why, ev.payload, ev.topic, ev.partition, ev.offset, received_at, ev.index, ev.event_id, t.tenant_id)
        )

    # -- thresholds --------------------------------------------------------------------
    @staticmethod
    def _next_limit(mp: MeterPeriod, pmi: PlanMeterIndex, pv: str) -> Decimal:
        for lv in pmi.levels:
            if (pv, lv.name) not in mp.fired:
                return lv.limit
        return _INF

    def _thresholds(self, t: TenantState, mp: MeterPeriod, pmi: PlanMeterIndex, pv: str, ev: Accepted, out: Out) -> None:
        """Fire every level the live total has reached, lowest first, once per period.
        Levels come from the plan in force at the event: after an upgrade the new plan's
        levels are new thresholds and fire when the period's usage reaches them."""
        usage = mp.live.value()
        for lv in pmi.levels:
            if lv.limit > usage:
                break
            if (pv, lv.name) in mp.fired:
                continue
            mp.fired.add((pv, lv.name))
            n = lv.threshold.sustained_periods
            if n is not None and not self._sustained(t, pmi.slug, lv, mp.period.idx, n):
                continue
            self.stats.alerts[lv.name] += 1
            tenant = self.cat.tenants[t.tenant_id].tenant
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
                    crossed_at=iso(ev.ts_ms),
                    correlation_id=ev.event_id,
                    plan_id=pmi.plan.id,
                    plan_version=pmi.plan.version,
                    detected_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    destinations=list(lv.threshold.notify),
                    sustained_periods=n,
                )
            )
        mp.next_limit = self._next_limit(mp, pmi, pv)

    @staticmethod
    def _sustained(t: TenantState, slug: str, lv: Level, idx: int, n: int) -> bool:
        """Record that `lv` was crossed in period `idx`; true once it held n periods running."""
        hist = t.sustained.setdefault((slug, lv.name), set())
        hist.add(idx)
        for old in [p for p in hist if p <= idx - n]:
            hist.discard(old)
        return all(idx - k in hist for k in range(n))

    # -- windows and rating ------------------------------------------------------------
    def _close(self, t: TenantState, cutoff: int, out: Out) -> None:
        t.hot.clear()
        due = sorted((k for k, w in t.open.items() if w.end_ms <= cutoff), key=lambda k: k[3])
        for k in due:
            self._emit(t, k, t.open.pop(k), 0, out)
        self.stats.open_windows -= len(due)
        if cutoff > t.closed_through:
            t.closed_through = cutoff

    def flush_idle(self, now: float) -> Out:
        """Close every open window of tenants quiet for `idle_timeout` (wall clock)."""
        out = Out()
        self._deadline_known = False
        for t in self.tenants.values():
            if t.open and now - t.last_wall >= self.cfg.idle_timeout_s:
                self._guard_tenant(t, self._close_all, out)
                t.next_due = -(2**62)
        return out

    def _close_all(self, t: TenantState, out: Out) -> None:
        self._close(t, max(w.end_ms for w in t.open.values()), out)

    def flush_all(self) -> Out:
        """Close every open window (end of a bounded input)."""
        out = Out()
        for t in self.tenants.values():
            if t.open:
                self._guard_tenant(t, self._close_all, out)
        return out

    def next_idle_deadline(self) -> float | None:
        """When the idle timer must next look. Asked after every activation, so the O(tenants)
        scan is cached: only a newly opened window can make the answer earlier (and clears
        the cache); anything else makes it later, and firing early is harmless."""
        if not self._deadline_known:
            walls = [t.last_wall for t in self.tenants.values() if t.open]
            self._deadline = min(walls) + self.cfg.idle_timeout_s if walls else None
            self._deadline_known = True
        return self._deadline

    def _corrections(self, t: TenantState, out: Out) -> None:
        t.hot.clear()
        for k in sorted(t.pending, key=lambda k: k[3]):
            mp = t.periods[(k[0], k[1])]
            mp.correction_seq += 1
            self._emit(t, k, t.pending[k], mp.correction_seq, out)
        t.pending.clear()

    def _emit(self, t: TenantState, k: WKey, acc: WindowAcc, revision: int, out: Out) -> None:
        slug, pidx, pv, _ = k
        mp = t.periods[(slug, pidx)]
        plan = self.cat.plans_by_version[pv]
        pmi = plan.meters[slug]
        closed = mp.closed.get(pv)
        if closed is None:
            closed = mp.closed[pv] = AGGREGATIONS[pmi.aggregation]()
        before = closed.value()
        closed.merge(acc.agg)
        after = closed.value()
        charged_before = pmi.rater.charge(before)
        charged = pmi.rater.charge(after)
        amount = charged - charged_before
        counts = getattr(mp, "closed_events", None)  # absent in snapshots of earlier versions
        if counts is None:
            counts = mp.closed_events = {}
        events = counts[pv] = counts.get(pv, 0) + acc.count
        out.totals.append((Decimal(after), charged, events))
        tenant = self.cat.tenants[t.tenant_id].tenant
        currency = plan.plan.currency
        self.stats.lines += 1
        self.stats.corrections += revision > 0
        self.stats.add_amount(currency, amount)
        out.lines.append(
            RatedUsageLine(
                line_id=stable_id("line", t.tenant_id, slug, acc.start_ms, pv, revision),
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
            )
        )

    def _finalize_periods(self, t: TenantState) -> None:
        """Forget periods past their grace: nothing can change them any more (bounded memory)."""
        final = [k for k, mp in t.periods.items() if mp.period.end_ms + self.cfg.grace_ms <= t.watermark]
        for k in final:
            if not any(w[0] == k[0] and w[1] == k[1] for w in t.open):
                del t.periods[k]
