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
from decimal import Decimal
from typing import Any

from xxhash import xxh3_64_intdigest

from operators import credits, thresholds
from operators.catalog_index import CatalogIndex, Cell, PlanIndex, PlanMeterIndex
from operators.credits import Credits
from operators.deadletters import clip, internal_error
from operators.dedup import Evicted, GenerationalDedup, event_hash, position
from operators.engine_state import Backstop, CellTotals, EngineConfig, MeterPeriod, Out, Slot, Spend, TenantState, WindowAcc, WKey
from operators.periods import Period, PeriodCache, iso
from operators.pricing import quantum
from operators.stats import Stats
from operators.validate import Item, Reject, Validator, Value, event_ms
from operators.windows import Windows
from schemas.events import GRANTED

ZERO = Decimal(0)
# An event that waits for the long-horizon store: the item, its dedup hash and event time.
Waiting = tuple[Any, bytes, int, int, "int | None", int, int]


class _Pass:
    """One pass over a batch: where it was read, where outcomes go, and (the first pass, when
    a store backs memory) the tenants and events that wait for the store's answer."""

    __slots__ = ("asking", "deferred", "due", "now", "out", "partition", "paused", "received", "seen", "topic", "touched")

    def __init__(
        self,
        topic: str,
        partition: int,
        now: float,
        received: str,
        out: Out,
        due: dict[str, TenantState],
        touched: set[str],
        *,
        asking: bool,
        seen: set[int] | None = None,
    ) -> None:
        self.topic, self.partition, self.now, self.received = topic, partition, now, received
        self.out, self.due, self.touched = out, due, touched
        self.asking, self.seen = asking, seen
        self.paused: set[str] = set()
        self.deferred: list[Waiting] = []


class ShardEngine:
    def __init__(self, judge: Validator, cfg: EngineConfig, stats: Stats, backstop: Backstop | None = None) -> None:
        """`judge`: the validator that decoded the events (its catalog is the engine's; a
        worker's engines and its intake share one)."""
        self.windows = Windows(judge.cat, cfg, stats)
        self._judge = judge
        self.cfg = cfg
        self.stats = stats
        self.backstop = backstop
        # The events this engine rates, by (tenant, pricing version, event time ms); the
        # others are not its input (a replay of some periods and tenants). None: all.
        self.accept: Callable[[str, str, int], bool] | None = None
        self.tenants: dict[str, TenantState] = {}
        self._periods = PeriodCache()
        self._meters = {m.slug for m in judge.cat.catalog.meters}  # what a grant may be limited to
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

    @property
    def judge(self) -> Validator:
        return self._judge

    @judge.setter
    def judge(self, judge: Validator) -> None:
        """A reloaded catalog's validator (and so its catalog), swapped in between batches."""
        self._judge = judge
        self.windows.cat = judge.cat
        self._meters = {m.slug for m in judge.cat.catalog.meters}

    # -- recovery ----------------------------------------------------------------------
    def state(self) -> dict[str, TenantState]:
        """What must survive a restart; catalog and counters are rebuilt, not snapshotted."""
        return self.tenants

    @classmethod
    def resume(
        cls, judge: Validator, cfg: EngineConfig, stats: Stats, state: dict[str, TenantState] | None, backstop: Backstop | None = None
    ) -> ShardEngine:
        eng = cls(judge, cfg, stats, backstop)
        if state:
            eng.tenants = state
            # Wall times of another process mean nothing here: idle counts from now.
            now = time.time()
            for t in state.values():
                t.last_wall = now
            eng._touched.append((now, {tid for tid, t in state.items() if t.open}))
        return eng

    # -- hot path ----------------------------------------------------------------------
    def process(self, items: list[Item], topic: str, partition: int, now: float, received_at: str) -> Out:
        """Judge and apply a shard's events of one topic partition, in one pass. A failure
        of ours on one event (a bug: the message's bounds were checked at intake) dead-letters
        that event as `internal_error` and the batch goes on after it; one try per batch, not
        per event. Events memory cannot judge as duplicates (a tenant new to this process,
        or one older than the dedup horizon and not in memory) wait, with every later event
        of their tenant, for one question to the long-horizon store after the pass; then
        they are applied in order."""
        out = Out()
        due: dict[str, TenantState] = {}
        touched: set[str] = set()
        self._touched.append((now, touched))
        self.last_touched = touched
        first = _Pass(topic, partition, now, received_at, out, due, touched, asking=self.backstop is not None)
        self._run(items, first)
        if first.deferred and self.backstop is not None:
            waiting = first.deferred
            questions = [(ev.subject, h, ts, position(partition, off, idx)) for ev, _, off, _, idx, h, ts in waiting]
            again = _Pass(topic, partition, now, received_at, out, due, touched, asking=False, seen=self.backstop.duplicates(questions))
            self._run([(ev, raw, off, mx, idx) for ev, raw, off, mx, idx, _, _ in waiting], again)
        for t in due.values():
            self._guard_tenant(t, self._maintain, out)
        return out

    def _run(self, items: list[Item], p: _Pass) -> None:
        start = 0
        while start < len(items):
            failed = self._apply(items, start, p)
            if failed is None:
                break
            i, exc = failed
            ev, raw, off, _, idx = items[i]
            why = internal_error(exc, "rating an event", tenant_id=getattr(ev, "subject", None), offset=off)
            self.stats.dead["internal_error"] += 1
            p.out.dead.append(self.judge.dead_letter("internal_error", why, raw, p.topic, p.partition, off, p.received, idx, ev))
            start = i + 1

    def _guard_tenant(self, t: TenantState, fn: Callable[[TenantState, Out], None], out: Out) -> None:
        """Tenant-level work (closing windows, rating): a failure of ours stays with its tenant."""
        try:
            fn(t, out)
        except Exception as e:
            internal_error(e, f"maintaining tenant {t.tenant_id}", tenant_id=t.tenant_id)

    def _apply(self, items: list[Item], start: int, p: _Pass) -> tuple[int, Exception] | None:
        """The hot loop from `start`; returns the index and error of an event that failed.

        One long function on purpose: judging, dedup, windows and thresholds of an event in
        one pass, with the catalog's and the batch's lookups in locals, is what keeps Python
        near its own limit here (a call or a record per step costs as much as the step)."""
        cfg = self.cfg
        W, grace, horizon = cfg.window_ms, cfg.grace_ms, cfg.dedup_horizon_ms
        tenants = self.tenants
        judge, accept = self.judge.judge, self.accept
        credit_types = self.judge.decoder.credit_classes
        out, due, touched, now = p.out, p.due, p.touched, p.now
        asking, seen, paused, deferred = p.asking, p.seen, p.paused, p.deferred
        part = p.partition
        # The current period and pricing version change rarely within a batch: keep them
        # in locals and recompute only when an event falls outside.
        p_start = p_end = final = 0
        p_kind = ""
        period: Period | None = None
        accepted = duplicates = 0
        i = start
        try:
            for i in range(start, len(items)):
                ev, raw, off, mx, idx = items[i]
                tid = ev.subject
                if paused and tid in paused:  # an earlier event of its tenant waits for the store: so does it
                    deferred.append((ev, raw, off, mx, idx, event_hash(tid, ev.source, ev.id), event_ms(ev)))
                    continue
                if type(ev) in credit_types:  # a prepaid grant or a void (rare): not usage
                    got = self._credit_event(ev, raw, off, mx, idx, p)
                    accepted += got == 1
                    duplicates += got == 0
                    continue
                try:
                    plan, ts, values = judge(ev, mx)
                except Reject as r:
                    self.stats.dead[r.reason] += 1
                    out.dead.append(self.judge.dead_letter(r.reason, r.message, raw, p.topic, part, off, p.received, idx, ev))
                    continue
                if accept is not None and not accept(tid, plan.pricing_version, ts):
                    self.stats.records_in -= 1  # not this run's input
                    continue
                h = xxh3_64_intdigest(f"{tid}\x1f{ev.source}\x1f{ev.id}".encode())  # dedup.event_hash
                t = tenants.get(tid)
                if asking and (t is None or (ts <= t.watermark - horizon and h not in t.dedup.cur and h not in t.dedup.prev)):
                    paused.add(tid)  # memory cannot judge it: the store is asked after the pass
                    deferred.append((ev, raw, off, mx, idx, h, ts))
                    continue
                if t is None:
                    t = tenants[tid] = TenantState(tid, GenerationalDedup(horizon))
                t.records += 1
                pv = plan.pricing_version
                if not (p_start <= ts < p_end) or p_kind != plan.billing_period:
                    period = self._periods.get(ts, plan.billing_period)
                    p_start, p_end, p_kind, final = period.start_ms, period.end_ms, period.kind, period.end_ms + grace
                assert period is not None
                if final <= t.watermark:
                    self._too_late(t, ev, ts, period, raw, p, off, idx)
                    continue
                d = t.dedup
                if h in d.cur or h in d.prev or (seen is not None and i in seen):
                    duplicates += 1
                    continue
                if plan.matrix and self._too_many_cells(t, plan, period, values):
                    self.stats.dead["too_many_cells"] += 1
                    why = self._cells_message(plan, period, values)
                    out.dead.append(self.judge.dead_letter("too_many_cells", why, raw, p.topic, part, off, p.received, idx, ev))
                    continue
                d.cur.add(h)
                log = d.cur_log
                log.append(h)
                pos = (off * 1_000_003 + part * 65_537 + (0xFFFF if idx is None else idx)) & 0xFFFFFFFF  # dedup.position
                log.append((pos << 32) | (ts // 3_600_000))  # dedup.meta
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
                for slug, v, cell in values:
                    slot = t.hot.get(slug if cell is None else (slug, cell))
                    if slot is None or slot.ws != ws or slot.pv != pv:
                        slot = self._slot(t, plan.meters[slug], period, pv, ws, cell)
                        if slot.late:
                            due[tid] = t  # its correction goes out with this batch
                    # Thresholds measure the usage under the event's pricing version (the
                    # slot's), as rating does: next_limit is that version's (levels_of). A
                    # matrix meter's thresholds measure its total over all cells.
                    lagg = slot.live
                    acc = slot.acc
                    if slot.summed:
                        live = lagg.v = lagg.v + v  # type: ignore[attr-defined]
                        acc.agg.v += v  # type: ignore[attr-defined]
                        if slot.cell_live is not None:
                            slot.cell_live.v += v  # type: ignore[attr-defined]
                    else:
                        lagg.add(v, ts)
                        live = lagg.value()
                        acc.agg.add(v, ts)
                        if slot.cell_live is not None:
                            slot.cell_live.add(v, ts)
                    mp = slot.mp
                    if live >= mp.next_limit:
                        thresholds.fire(self.cat, self.stats, t, mp, plan.meters[slug], pv, ts, ev.id, out)
                    acc.count += 1
                    if ts < acc.first_ms:
                        acc.first_ms = ts
                    if ts > acc.last_ms:
                        acc.last_ms = ts
                if plan.spend:
                    self._spend(t, plan, period, values, ts, ev.id, out)
                accepted += 1  # last: an event that failed above is not counted as accepted
        except Exception as e:
            return i, e
        finally:
            self.stats.accepted += accepted
            self.stats.duplicates += duplicates
        return None

    def _slot(self, t: TenantState, pmi: PlanMeterIndex, period: Period, pv: str, ws: int, cell: Cell | None = None) -> Slot:
        """Find or open the window (and period state) an event belongs to; cache it as hot."""
        mk = (pmi.slug, period.idx)
        mp = t.periods.get(mk)
        if mp is None:
            mp = t.periods[mk] = MeterPeriod(period)
            t.next_due = min(t.next_due, period.end_ms + self.cfg.grace_ms)
        live = mp.live.get(pv)
        if live is None:
            live = mp.live[pv] = pmi.new_agg()
        cell_live = None
        if cell is not None:
            ct = mp.cells.get(cell)
            if ct is None:
                ct = mp.cells[cell] = CellTotals()
            cell_live = ct.live.get(pv)
            if cell_live is None:
                cell_live = ct.live[pv] = pmi.new_agg()
        if mp.levels_of != pv:
            # Events of another version (late ones dated before a plan change) switch the
            # period to that version's levels; fired levels are kept per version.
            mp.levels_of = pv
            mp.next_limit = thresholds.next_limit(mp, pmi, pv)
        we = min(ws - ws % self.cfg.window_ms + self.cfg.window_ms, period.end_ms)
        late = we <= t.closed_through
        wk: WKey = (pmi.slug, period.idx, pv, ws) if cell is None else (pmi.slug, period.idx, pv, ws, cell)
        windows = t.pending if late else t.open
        acc = windows.get(wk)
        if acc is None:
            acc = windows[wk] = WindowAcc(pmi.new_agg(), ws, we)
            if not late:
                self.stats.open_windows += 1
                t.next_due = min(t.next_due, we + self.cfg.allowed_lateness_ms)
        slot = t.hot[pmi.slug if cell is None else (pmi.slug, cell)] = Slot(pv, ws, late, pmi.summed, mp, acc, live, cell_live)
        return slot

    def _too_many_cells(self, t: TenantState, plan: PlanIndex, period: Period, values: list[Value]) -> bool:
        """Whether an event would open a cell past its meter's `max_cells` in this tenant's
        period (counted across pricing versions; SPEC §9.8)."""
        for slug, _, cell in values:
            if cell is None:
                continue
            mp = t.periods.get((slug, period.idx))
            cells = mp.cells if mp is not None else {}
            matrix = plan.meters[slug].matrix
            if cell not in cells and matrix is not None and len(cells) >= matrix.max_cells:
                return True
        return False

    def _cells_message(self, plan: PlanIndex, period: Period, values: list[Value]) -> str:
        slug = next(s for s, _, c in values if c is not None)
        matrix = plan.meters[slug].matrix
        n = matrix.max_cells if matrix is not None else 0
        return (
            f"meter '{slug}' already has {n} distinct cells in period {period.key} for this tenant (max_cells of plan "
            f"'{plan.pricing_version}'); raise max_cells or fix the producer's dimension values, then re-drive it"
        )

    def _spend(self, t: TenantState, plan: PlanIndex, period: Period, values: list[Value], ts: int, event_id: str, out: Out) -> None:
        """The period's running gross after an accepted event, across meters and pricing
        versions (money is money): each spend threshold it reaches fires once, by this event."""
        sp = t.spend.get(period.key)
        if sp is None:
            sp = t.spend[period.key] = Spend()
        pv = plan.pricing_version
        for slug, _, cell in values:
            pmi = plan.meters[slug]
            mp = t.periods[(slug, period.idx)]
            agg = mp.live[pv] if cell is None else mp.cells[cell].live[pv]
            charge = pmi.amount(agg, cell)
            key = (slug, pv, cell)
            sp.gross += charge - sp.charges.get(key, ZERO)
            sp.charges[key] = charge
        for st in plan.spend:
            if st.amount > sp.gross:
                break
            if st.level not in sp.fired:
                sp.fired.add(st.level)
                thresholds.fire_spend(self.cat, self.stats, t, plan, period, st, sp.gross, ts, event_id, out)

    def _maintain(self, t: TenantState, out: Out) -> None:
        """Work due when a tenant's watermark passes a window end or a period's grace."""
        gone = t.dedup.advance(t.watermark)
        if gone is not None and self.backstop is not None:
            self.backstop.evicted([Evicted(t.tenant_id, *gone)])
        self.windows.close(t, t.watermark - self.cfg.allowed_lateness_ms, out)
        if t.pending:
            self.windows.corrections(t, out)
        if t.credits is not None:  # after the windows (they may still draw), before the periods close
            self._expire(t, out)
        self.windows.finalize_periods(t, out)
        if t.true_ups:  # kept for the read model's last word on the period, long enough to be written
            written = t.watermark - self.cfg.grace_ms - 35 * 86_400_000
            for key in [k for k, (_, _, end) in t.true_ups.items() if end <= written]:
                del t.true_ups[key]
        if t.spend:  # a forgotten period's running gross goes with it
            live = {mp.period.key for mp in t.periods.values()}
            for key in [k for k in t.spend if k not in live]:
                del t.spend[key]
        t.hot.clear()
        lateness = self.cfg.allowed_lateness_ms
        due = [w.end_ms + lateness for w in t.open.values()]
        due += [mp.period.end_ms + self.cfg.grace_ms for mp in t.periods.values()]
        due.append(t.dedup.next_rotation())
        if t.credits is not None:  # expiries ahead; one already passed waits for its window's end, due above
            wm = t.watermark
            due += [
                g.expires_ms for g in t.credits.grants.values() if g.status == "active" and g.expires_ms is not None and g.expires_ms > wm
            ]
        t.next_due = min(due)

    def _credit_event(self, ev: Any, raw: bytes, off: int, mx: int, idx: int | None, p: _Pass) -> int:
        """A grant or a void, in its tenant's order (SPEC §9.5): 1 accepted, 0 a duplicate
        (the same event again, a repeated grant_id, a second void), -1 a dead letter. Never
        moves a watermark."""
        kind = self.judge.decoder.credit_classes[type(ev)]
        try:
            ti, ts = self.judge.judge_credit(ev, mx)
            t = self.tenants.get(ev.subject)
            if t is None:
                t = self.tenants[ev.subject] = TenantState(ev.subject, GenerationalDedup(self.cfg.dedup_horizon_ms))
            t.records += 1
            h = xxh3_64_intdigest(f"{ev.subject}\x1f{ev.source}\x1f{ev.id}".encode())
            d = t.dedup
            if h in d.cur or h in d.prev:
                return 0
            cr = t.credits if t.credits is not None else Credits()
            data = ev.data
            if kind == GRANTED:
                why = credits.check_grant(data, quantum(data.currency), self._meters)
                if why is not None:
                    raise Reject("bad_grant", f"grant '{clip(data.grant_id)}': {why}")
                if data.grant_id in cr.grants:
                    return 0
                g = cr.grants[data.grant_id] = credits.grant_of(data, len(cr.grants))
                p.out.credits.append(
                    credits.record("granted", t.tenant_id, ti.tenant.erp_customer_id, g, g.amount, ts, legal_entity=ti.tenant.legal_entity)
                )
            else:
                g = cr.grants.get(data.grant_id)  # type: ignore[assignment]
                if g is None:
                    raise Reject("bad_grant", f"data.grant_id: no grant '{clip(data.grant_id)}' for tenant '{clip(ev.subject)}' to void")
                if g.status == "voided":
                    return 0
                rest = g.remaining if g.status == "active" else Decimal(0)
                g.status = "voided"
                g.voided = rest
                # Also when nothing remains (amount 0): after a crash replay that drew more than
                # the first run, it corrects the void the first run emitted. The register (or the
                # sink without one) never emits a first record of 0 (SPEC §9.8).
                p.out.credits.append(
                    credits.record("voided", t.tenant_id, ti.tenant.erp_customer_id, g, rest, ts, legal_entity=ti.tenant.legal_entity)
                )
            t.credits = cr
            if t.last_wall != p.now:  # the read model shows the tenant's grants: it is due a write
                t.last_wall = p.now
                p.touched.add(t.tenant_id)
            d.cur.add(h)
            pos = (off * 1_000_003 + p.partition * 65_537 + (0xFFFF if idx is None else idx)) & 0xFFFFFFFF  # dedup.position
            d.cur_log.append(h)
            d.cur_log.append((pos << 32) | (ts // 3_600_000))
            return 1
        except Reject as r:
            self.stats.dead[r.reason] += 1
            p.out.dead.append(self.judge.dead_letter(r.reason, r.message, raw, p.topic, p.partition, off, p.received, idx, ev))
            return -1

    def _expire(self, t: TenantState, out: Out) -> None:
        """Grants whose expiry the watermark has passed, once the window holding it has been
        emitted (that window may still draw, SPEC §9.8): what remains expires, once."""
        assert t.credits is not None
        for g in sorted(t.credits.grants.values(), key=lambda g: g.grant_id):
            if g.status != "active" or g.expires_ms is None or t.watermark < g.expires_ms:
                continue
            if any(w.start_ms <= g.expires_ms < w.end_ms for w in t.open.values()):
                continue
            g.status = "expired"
            rest = g.remaining
            g.expired = rest
            tenant = self.cat.tenants[t.tenant_id].tenant
            # Also when nothing remains (amount 0), for the register to correct a first run's
            # expiry that a replay's draws used up (as a void above).
            out.credits.append(
                credits.record("expired", t.tenant_id, tenant.erp_customer_id, g, rest, g.expires_ms, legal_entity=tenant.legal_entity)
            )

    def _too_late(self, t: TenantState, ev: Any, ts: int, period: Period, raw: bytes, p: _Pass, off: int, idx: int | None) -> None:
        self.stats.dead["too_late"] += 1
        final = period.end_ms + self.cfg.grace_ms
        why = f"event time {iso(ts)} is in period {period.key}, final since {iso(final)}; tenant watermark is {iso(t.watermark)}"
        p.out.dead.append(self.judge.dead_letter("too_late", why, raw, p.topic, p.partition, off, p.received, idx, ev))

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
