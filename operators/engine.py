"""The per-shard engine: dedup, lateness, thresholds, tumbling windows, rating.

One engine owns a fixed shard of tenants, so all of a tenant's state lives in one place
and the dataflow can hand it whole batches. Thresholds are checked on every accepted
event (alerts are immediate); windows close when the tenant's watermark passes them or
the tenant has been quiet for `idle_timeout`; an event for a window already closed is a
correction (signed delta, revision > 0) until its billing period's grace has passed, and a
`too_late` dead letter after that.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from operators import thresholds
from operators.aggregate import AGGREGATIONS
from operators.catalog_index import CatalogIndex, PlanMeterIndex
from operators.deadletters import dead_letter, internal_error
from operators.dedup import Evicted, GenerationalDedup
from operators.engine_state import Backstop, EngineConfig, MeterPeriod, Out, Slot, TenantState, WindowAcc
from operators.periods import Period, PeriodCache, iso
from operators.stats import Stats
from operators.windows import Windows
from schemas.records import Accepted


class ShardEngine:
    def __init__(self, catalog: CatalogIndex, cfg: EngineConfig, stats: Stats, backstop: Backstop | None = None) -> None:
        self.windows = Windows(catalog, cfg, stats)
        self.cat = catalog
        self.cfg = cfg
        self.stats = stats
        self.backstop = backstop
        self.tenants: dict[str, TenantState] = {}
        self._periods = PeriodCache()
        # Idle detection without scanning tenants: per batch, its wall time and the tenants
        # it touched, oldest first; a tenant touched again later is skipped when its batch
        # comes due (its last_wall moved on).
        self._touched: deque[tuple[float, set[str]]] = deque()
        # Tenants with an accepted event in the last `process` call that were not already
        # touched at the same `now` (callers that need every call's tenants pass a new `now`).
        self.last_touched: set[str] = set()

    @property
    def cat(self) -> CatalogIndex:
        return self.windows.cat

    @cat.setter
    def cat(self, catalog: CatalogIndex) -> None:
        """A reloaded catalog, swapped in between batches."""
        self.windows.cat = catalog

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
            # Wall times of another process mean nothing here: idle counts from now.
            now = time.time()
            for t in state.values():
                t.last_wall = now
            eng._touched.append((now, {tid for tid, t in state.items() if t.open}))
        return eng

    # -- hot path ----------------------------------------------------------------------
    def _ask_backstop(self, batch: list[Accepted], backstop: Backstop) -> None:
        """Mark events memory cannot judge: a copy that memory no longer holds is at least a
        horizon older than its tenant's watermark, and a tenant new to this process (a
        restart without recovery state) has no memory at all."""
        horizon, tenants = self.cfg.dedup_horizon_ms, self.tenants
        ask = []
        for ev in batch:
            t = tenants.get(ev.tenant_id)
            if t is None or (ev.ts_ms <= t.watermark - horizon and ev.h not in t.dedup.cur and ev.h not in t.dedup.prev):
                ask.append(ev)
        if ask:
            for i in backstop.duplicates(ask):
                ask[i].seen = True

    def process(self, batch: list[Accepted], now: float, received_at: str) -> Out:
        """Apply a shard's sub-batch. A failure of ours on one event (a bug: every bound was
        checked by the validator) dead-letters that event as `internal_error` and the batch
        goes on after it; one try per batch, not per event."""
        out = Out()
        backstop = self.backstop
        if backstop is not None:
            self._ask_backstop(batch, backstop)
        due: dict[str, TenantState] = {}
        touched: set[str] = set()
        self._touched.append((now, touched))
        self.last_touched = touched
        start = 0
        while start < len(batch):
            failed = self._apply(batch, start, now, received_at, out, due, touched)
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
        touched: set[str],
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
                t.records += 1
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
                h = ev.h
                if h in d.cur or h in d.prev or ev.seen:
                    duplicates += 1
                    continue
                d.cur.add(h)
                log = d.cur_log
                log.append(h)
                log.append(ev.m)
                if t.last_wall != now:
                    t.last_wall = now
                    touched.add(tid)
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
                    # Thresholds measure the usage under the event's pricing version (the
                    # slot's), as rating does: next_limit is that version's (levels_of).
                    lagg = slot.live
                    acc = slot.acc
                    if slot.summed:
                        live = lagg.v = lagg.v + v  # type: ignore[attr-defined]
                        acc.agg.v += v  # type: ignore[attr-defined]
                    else:
                        lagg.add(v, ts)
                        live = lagg.value()
                        acc.agg.add(v, ts)
                    mp = slot.mp
                    if live >= mp.next_limit:
                        thresholds.fire(self.cat, self.stats, t, mp, plan.meters[slug], pv, ev, out)
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
            mp = t.periods[mk] = MeterPeriod(period)
            t.next_due = min(t.next_due, period.end_ms + self.cfg.grace_ms)
        live = mp.live.get(pv)
        if live is None:
            live = mp.live[pv] = AGGREGATIONS[pmi.aggregation]()
        if mp.levels_of != pv:
            # Events of another version (late ones dated before a plan change) switch the
            # period to that version's levels; fired levels are kept per version.
            mp.levels_of = pv
            mp.next_limit = thresholds.next_limit(mp, pmi, pv)
        we = min(ws - ws % self.cfg.window_ms + self.cfg.window_ms, period.end_ms)
        late = we <= t.closed_through
        wk = (pmi.slug, period.idx, pv, ws)
        windows = t.pending if late else t.open
        acc = windows.get(wk)
        if acc is None:
            acc = windows[wk] = WindowAcc(AGGREGATIONS[pmi.aggregation](), ws, we)
            if not late:
                self.stats.open_windows += 1
                t.next_due = min(t.next_due, we + self.cfg.allowed_lateness_ms)
        slot = t.hot[pmi.slug] = Slot(pv, ws, late, pmi.aggregation in ("SUM", "COUNT"), mp, acc, live)
        return slot

    def _maintain(self, t: TenantState, out: Out) -> None:
        """Work due when a tenant's watermark passes a window end or a period's grace."""
        gone = t.dedup.advance(t.watermark)
        if gone is not None and self.backstop is not None:
            self.backstop.evicted([Evicted(t.tenant_id, *gone)])
        self.windows.close(t, t.watermark - self.cfg.allowed_lateness_ms, out)
        if t.pending:
            self.windows.corrections(t, out)
        self.windows.finalize_periods(t, out)
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

    # -- windows --------------------------------------------------------------------------
    def flush_idle(self, now: float) -> Out:
        """Close every open window of tenants quiet for `idle_timeout` (wall clock). Only the
        tenants of batches that old are looked at, never all of them."""
        out = Out()
        idle = self.cfg.idle_timeout_s
        touched = self._touched
        while touched and touched[0][0] + idle <= now:
            at, tids = touched.popleft()
            for tid in tids:
                t = self.tenants.get(tid)
                if t is not None and t.open and t.last_wall <= at:
                    self._guard_tenant(t, self._close_all, out)
                    t.next_due = -(2**62)
        return out

    def _close_all(self, t: TenantState, out: Out) -> None:
        self.windows.close(t, max(w.end_ms for w in t.open.values()), out)

    def flush_all(self) -> Out:
        """Close every open window and hand all of memory to the long-horizon store (the end
        of a bounded input: nothing this process remembers may be lost with it)."""
        out = Out()
        gone: list[Evicted] = []
        for t in self.tenants.values():
            if t.open:
                self._guard_tenant(t, self._close_all, out)
            drained = t.dedup.drain()
            if drained is not None:
                gone.append(Evicted(t.tenant_id, *drained))
        if gone and self.backstop is not None:
            self.backstop.evicted(gone)
        return out

    def next_idle_deadline(self) -> float | None:
        """When the idle timer must next look: the oldest batch's time plus the timeout (it
        may find nothing to close, which costs one look)."""
        while self._touched and not self._touched[0][1]:
            self._touched.popleft()
        return self._touched[0][0] + self.cfg.idle_timeout_s if self._touched else None
