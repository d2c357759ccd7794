"""The rating dataflow's Bytewax steps: intake (validate and shard), the per-shard engine
step, and the sink that settles rated lines against the register before the outbox.

Crash safety (with a recovery directory): Bytewax restores input offsets and engine state
from the last snapshot and replays the input after it. What the replay re-derives is made
harmless outside: the long-horizon dedup store knows events by position (a replayed message
is not its own duplicate) and is drained before each snapshot, rated lines are settled
against the emission register (only differences go out), and alerts carry deterministic ids
that the delivery ledger has seen.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Message

from connectors.kafka_source import BACKLOG, Backlog
from operators.aggregate import Agg
from operators.catalog_index import CatalogIndex
from operators.credits import line_records
from operators.deadletters import encode_fitted, internal_error, shrink_encoded
from operators.dedup import event_hash
from operators.engine import ShardEngine
from operators.engine_state import MeterPeriod, Out, TenantState
from operators.periods import iso
from operators.settlement import Totals
from operators.sharding import Sharder
from operators.stats import Stats
from operators.usage import LevelsCache, facts
from operators.validate import Item, Validator
from runtime.catalog_watch import CatalogWatch
from runtime.settings import EngineSettings, KafkaSettings, Topics
from schemas.events import InputLimits
from schemas.outputs import ENCODER, CreditRecord, DeadLetter, RatedUsageLine
from schemas.usage import UsageFacts
from sinks.kafka import KafkaOutbox, Record
from state.dedup_store import DedupStore
from state.read_model import ReadModelWriter
from state.register import EmissionRegister

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ShardOut:
    """What a shard emits: encoded alerts and dead letters, and rated lines with their
    period-to-date totals, which the sink settles against the register for all shards."""

    records: list[Record] = field(default_factory=list)
    lines: list[RatedUsageLine] = field(default_factory=list)
    totals: list[Totals] = field(default_factory=list)
    credits: list[CreditRecord] = field(default_factory=list)  # grant-level credit records, settled with the lines

    def __bool__(self) -> bool:
        return bool(self.records or self.lines or self.credits)


# What intake sends a shard: the events of one topic partition for it (judged in the shard's
# one pass), where they were read, and encoded dead letters that merely ride along (so the
# flow needs no branch/merge steps, each a per-item Python call).
ShardItem = tuple[list[Item], str, int, list[Record]]


class Encoder:
    """Engine output -> Kafka records: keyed by tenant, dead letters cut to fit."""

    def __init__(self, topics: Topics, output_max_bytes: int, max_key: int, *, alerts: bool = True, dead_letters: bool = True) -> None:
        """`max_key`: a dead letter's tenant longer than this (an invalid subject) is no key."""
        self.topics, self.cap, self.max_key = topics, output_max_bytes, max_key
        self.alerts, self.dead_letters = alerts, dead_letters

    def dead(self, dead: list[DeadLetter]) -> list[Record]:
        if not self.dead_letters:
            return []
        out: list[Record] = []
        for d in dead:
            key = d.tenant_id.encode() if d.tenant_id and len(d.tenant_id) <= self.max_key else None
            out.append((self.topics.dlq, key, encode_fitted(d, self.cap - len(key or b""))))
        return out

    def out(self, o: Out, into: ShardOut) -> None:
        recs = into.records
        if self.alerts:
            recs += [(self.topics.alerts, a.tenant_id.encode(), ENCODER.encode(a)) for a in o.alerts]
            for a in o.alerts:  # few (one per level and period): each is worth a line
                log.info(
                    "threshold alert",
                    extra={
                        "alert_id": a.alert_id,
                        "correlation_id": a.correlation_id,
                        "tenant_id": a.tenant_id,
                        "meter": a.meter,
                        "threshold": a.level,
                        "period": a.period,
                    },
                )
        recs += self.dead(o.dead)
        into.lines.extend(o.lines)
        into.totals.extend(o.totals)
        into.credits.extend(o.credits)


class Intake:
    """Per consumed batch: decode, and group the events by their tenant's shard (each shard
    judges its own, in one pass); dead letters ride with one of the items. A reloaded catalog
    is swapped in between batches."""

    def __init__(self, watch: CatalogWatch, limits: InputLimits, stats: Stats, enc: Encoder, shards: int) -> None:
        self.watch, self.limits, self.stats, self.enc = watch, limits, stats, enc
        self.validator = Validator(watch.index, stats, limits)
        self.sharder = Sharder(shards)
        watch.listeners.append(self._reloaded)

    def _reloaded(self, idx: CatalogIndex) -> None:
        self.validator = Validator(idx, self.stats, self.limits)

    def __call__(self, msgs: list[Message]) -> list[tuple[str, ShardItem]]:
        self.watch.poll()
        if not msgs:
            return []
        now_ms = int(time.time() * 1000)
        m0 = msgs[0]  # a source item holds one partition's messages, oldest first
        ts = m0.timestamp()[1]  # its producer's time (CreateTime): what waiting for intake costs alerts
        self.stats.input_delay_s = max(0, now_ms - ts) / 1000 if ts > 0 else 0.0
        topic, partition = m0.topic() or "", m0.partition() or 0
        groups, dead = self.validator.route(msgs, topic, partition, iso(now_ms), now_ms, self.sharder)
        items: list[tuple[str, ShardItem]] = [(k, (batch, topic, partition, [])) for k, batch in groups.items()]
        if dead:
            if items:
                items[0][1][3].extend(self.enc.dead(dead))
            else:
                items.append((self.sharder(dead[0].tenant_id or ""), ([], topic, partition, self.enc.dead(dead))))
        return items


Final = tuple[str, tuple[str, int], MeterPeriod]  # a period the engine forgot: tenant, (meter, idx), state
_MOVED = {"operators.rating": "operators.engine_state"}


class _Unpickler(pickle.Unpickler):
    """Snapshots of earlier versions name the state's classes where they lived then."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MOVED.get(module, module), name)


def _migrate(state: dict[str, TenantState]) -> dict[str, TenantState]:
    """Snapshots from before dedup keys were hashes: their string keys become hashes (their
    positions are unknown: they are taken as new when evicted). Snapshots from before live
    totals were kept per pricing version: see `_live_per_version`."""
    for t in state.values():
        d = t.dedup
        if not hasattr(d, "cur_log"):
            d.cur, d.prev = ({event_hash(t.tenant_id, *str(k).split("\x1f", 1)) for k in ids} for ids in (d.cur, d.prev))
            d.cur_log, d.prev_log = (array("Q", [x for h in ids for x in (h, 0)]) for ids in (d.cur, d.prev))
        _live_per_version(t)
        for mp in t.periods.values():
            if not hasattr(mp, "crossed"):  # from before the read model: crossing times unknown
                mp.crossed, mp.last_ms = {}, -(2**62)
        if not hasattr(t, "records"):  # from before the read model's guard counted records
            t.records = 0
        if not hasattr(t, "spend"):  # from before spend thresholds
            t.spend = {}
        if not hasattr(t, "credits"):  # from before prepaid credits
            t.credits, t.gross, t.true_ups = None, {}, {}
        for mp in t.periods.values():
            if not hasattr(mp, "cells"):  # from before matrix pricing
                mp.cells = {}
        t.hot.clear()  # a cache; its slots may be of an earlier layout
    return state


def _live_per_version(t: TenantState) -> None:
    """Snapshots from before thresholds were measured per pricing version hold one live
    aggregate per meter period, all versions together. Each version's live aggregate is
    rebuilt exactly from what the snapshot keeps per version: its closed total merged with
    its open and pending windows (every accepted event is in exactly one of them). A period
    with none of those (never written so) keeps the old total under the version its levels
    were last computed for. The hot slots predate the change (no `live`): they are a cache,
    dropped."""
    old: dict[tuple[str, int], Any] = {k: mp.live for k, mp in t.periods.items() if not isinstance(mp.live, dict)}
    if not old:
        return
    rebuilt: dict[tuple[str, int], dict[str, Agg]] = {k: {} for k in old}

    def merge(k: tuple[str, int], pv: str, agg: Agg) -> None:
        live = rebuilt[k]
        into = live.get(pv)
        if into is None:
            into = live[pv] = type(old[k])()  # the same aggregation, empty
        into.merge(agg)

    for k in old:
        for pv, agg in t.periods[k].closed.items():
            merge(k, pv, agg)
    for windows in (t.open, t.pending):
        for (slug, idx, pv, _), acc in windows.items():
            if (slug, idx) in rebuilt:
                merge((slug, idx), pv, acc.agg)
    for k, live in rebuilt.items():
        mp = t.periods[k]
        if not live and mp.levels_of:
            live[mp.levels_of] = old[k]
        mp.live = live
    t.hot.clear()


class Budget:
    """A share of wall time, as a token bucket of seconds (up to one second's worth; it
    starts empty: the share is earned before it is spent)."""

    __slots__ = ("share", "stamp", "tokens")

    def __init__(self, share: float) -> None:
        self.share, self.tokens, self.stamp = share, 0.0, time.monotonic()

    def allows(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.share, self.tokens + (now - self.stamp) * self.share)
        self.stamp = now
        return self.tokens > 0

    def spend(self, seconds: float) -> None:
        self.tokens = max(-1.0, self.tokens - seconds)


class UsagePublisher:
    """Writes the read model (operators/usage.py) of the tenants touched since they were last
    written: a pass over a worker's shards at most once per interval, each slice of it one
    Redis call for its documents; a cost that grows with the tenants active in an interval,
    not with events.

    Its share of the process's time is capped, so rating and alerts come first:

    * a pass is cut into slices of at most `slice_s` of CPU (whole shards), and the worker
      takes its input between them, so no pass holds the input for longer than a slice;
    * the next pass starts at least the last one's cost over `steady` after it began (with
      many active tenants the interval stretches: `steady` of the time at most). That is
      time the process has to spare: while input is waiting (the process is catching up or
      at its limit: `Backlog`) passes spend at most `busy` of the wall time (a token bucket
      charged only then, so what was spent while there was time to spare is no debt the
      input has to wait out later), when the figures are as late as the input anyway.

    Costs are CPU time (the worker's and the writer thread's), not wall time."""

    @dataclass(slots=True)
    class _Pass:
        """A pass over a worker's shards, in progress."""

        started: float  # wall time of its first slice
        cursor: int = 0  # the next shard
        spent: float = 0.0  # CPU seconds so far (worker and writer thread)

    def __init__(
        self,
        writer: ReadModelWriter,
        interval_s: float,
        stats: Stats,
        steady: float = 0.20,
        busy: float = 0.03,
        backlog: Backlog = BACKLOG,
        slice_s: float = 0.005,
    ) -> None:
        self.writer, self.interval_s, self.stats, self.steady, self.backlog = writer, interval_s, stats, steady, backlog
        self.busy = Budget(busy)
        self.slice_s = slice_s
        self.levels: LevelsCache = {}
        self._thread_seen = 0.0
        # Per worker thread: its shards (a pass touches only its own thread's engines), when
        # its next slice is due, and its pass in progress.
        self._shards: dict[int, list[ShardLogic]] = {}
        self._due: dict[int, float] = {}
        self._pass: dict[int, UsagePublisher._Pass] = {}

    def register(self, shard: ShardLogic) -> None:
        self._shards.setdefault(threading.get_ident(), []).append(shard)

    def due(self) -> float:
        return self._due.get(threading.get_ident(), 0.0)

    def round(self, now: float, force: bool = False) -> None:
        """A slice of the pass over this thread's shards (the next pass, if none is under way),
        if the interval and the budget allow; `force`: every dirty tenant now, whole (a
        snapshot's barrier, the end of a bounded input)."""
        me = threading.get_ident()
        behind = self.backlog.behind()
        if not force and (now < self._due.get(me, 0.0) or (behind and not self.busy.allows())):
            if now >= self._due.get(me, 0.0):
                self._due[me] = now + self.interval_s  # over budget: look again then
            return
        started = time.thread_time()  # CPU, not wall: waiting for the GIL or Redis is not its cost
        now_ms = int(now * 1000)
        shards = self._shards.get(me, [])
        p = self._pass.get(me)
        if p is None or force:
            p = self._pass[me] = self._Pass(now, 0, p.spent if p is not None else 0.0)
        docs: list[UsageFacts] = []
        while p.cursor < len(shards):
            shard = shards[p.cursor]
            p.cursor += 1
            if shard.dirty or shard.final:
                docs += self._facts(shard.engine, shard.dirty, shard.final, now_ms)
                shard.dirty, shard.final = set(), []
                if not force and time.thread_time() - started >= self.slice_s:
                    break
        if docs:
            self.writer.submit(docs)
        # The worker's time, and the writer thread's since the last slice: the read model's cost.
        thread = self.writer.thread_seconds
        spent = time.thread_time() - started + thread - self._thread_seen
        self._thread_seen = thread
        if behind:
            self.busy.spend(spent)
        self.stats.read_model_seconds += spent
        self.stats.read_model_docs += len(docs)
        p.spent += spent
        if p.cursor < len(shards):
            self._due[me] = now  # the rest of the pass at the worker's next turn, after its input
        else:
            del self._pass[me]
            self._due[me] = p.started + max(self.interval_s, p.spent / self.steady)

    def _facts(self, engine: ShardEngine, tenants: set[str], final: list[Final], now_ms: int) -> list[UsageFacts]:
        docs: list[UsageFacts] = []
        finals: dict[str, list[tuple[tuple[str, int], MeterPeriod]]] = {}
        for tid, k, mp in final:
            finals.setdefault(tid, []).append((k, mp))
        for tid in tenants | finals.keys():
            t = engine.tenants.get(tid)
            if t is None:
                continue
            try:
                gone = finals.get(tid, [])
                docs += facts(t, now_ms, gone, self.levels)
                for (slug, idx), _ in gone:  # written for the last time
                    self.levels.pop((tid, slug, idx), None)
            except Exception as e:  # a bug of ours: that tenant's figures go stale, rating goes on
                internal_error(e, f"building the read model of tenant {tid}", tenant_id=tid)
        return docs

    def flush(self) -> None:
        """Until everything submitted is written (the end of a bounded input)."""
        self.writer.flush()


class ShardLogic(StatefulBatchLogic[ShardItem, ShardOut, bytes]):
    def __init__(self, engine: ShardEngine, enc: Encoder, snapshots: bool, store: DedupStore | None, usage: UsagePublisher | None) -> None:
        self.engine, self.enc, self.snapshots, self.store, self.usage = engine, enc, snapshots, store, usage
        self.dirty: set[str] = set()  # tenants whose read model is behind
        self.final: list[Final] = []  # periods the engine forgot since, for their last write
        self._now = 0.0
        if usage is not None:
            usage.register(self)

    @classmethod
    def builder(
        cls,
        intake: Intake,
        engine: EngineSettings,
        stats: Stats,
        enc: Encoder,
        snapshots: bool,
        store: DedupStore | None,
        usage: UsagePublisher | None = None,
        accept: Callable[[str, str, int], bool] | None = None,
    ) -> Callable[[bytes | None], ShardLogic]:
        """Bytewax's `build_logic`: one engine per shard, resumed from its snapshot, judging
        with the intake's validator (swapped with it when the catalog is reloaded). `accept`:
        see `ShardEngine.accept`."""
        cfg = engine.config()
        engines: list[ShardEngine] = []
        watch = intake.watch

        def reloaded(idx: CatalogIndex) -> None:
            for eng in engines:
                eng.judge = intake.validator

        watch.listeners.append(reloaded)  # after the intake's own: its new validator is ready

        def build(resume: bytes | None) -> ShardLogic:
            state: dict[str, TenantState] | None = _migrate(_Unpickler(io.BytesIO(resume)).load()) if resume else None
            engine = ShardEngine.resume(intake.validator, cfg, stats, state, store)
            engine.accept = accept
            engines.append(engine)
            return cls(engine, enc, snapshots, store, usage)

        return build

    def _publish(self, res: ShardOut, now: float, force: bool = False) -> None:
        """Mark the tenants whose windows closed; write the read model if its interval passed."""
        if self.usage is None:
            return
        if res.lines:
            self.dirty.update([ln.tenant_id for ln in res.lines])
        if (self.dirty or self.final) and (force or now >= self.usage.due()):
            self.usage.round(now, force)

    def _take(self, o: Out, res: ShardOut) -> None:
        self.enc.out(o, res)
        if o.final and self.usage is not None:
            self.final += o.final

    def _emit(self, o: Out, now: float, force: bool = False) -> tuple[list[ShardOut], bool]:
        res = ShardOut()
        self._take(o, res)
        self._publish(res, now, force)
        return ([res] if res else [], self.RETAIN)

    def on_batch(self, values: list[ShardItem]) -> tuple[list[ShardOut], bool]:
        # A new `now` per call: the engine's touched tenants (the read model's dirty ones)
        # are those first touched at a given `now`.
        now = self._now = max(time.time(), self._now + 1e-6)
        received = iso(int(now * 1000))
        res = ShardOut()
        for batch, topic, partition, passthrough in values:
            res.records.extend(passthrough)
            if batch:
                self._take(self.engine.process(batch, topic, partition, now, received), res)
                if self.usage is not None:
                    self.dirty |= self.engine.last_touched
        self._publish(res, now)
        return ([res] if res else [], self.RETAIN)

    def on_notify(self) -> tuple[list[ShardOut], bool]:
        now = time.time()
        return self._emit(self.engine.flush_idle(now), now)

    def on_eof(self) -> tuple[list[ShardOut], bool]:
        res = self._emit(self.engine.flush_all(), time.time(), force=True)  # hands all of memory to the store ...
        if self.usage is not None:
            self.usage.flush()  # a bounded run ends with its read model written
        if self.store is not None:
            self.store.drain()  # ... which a bounded run (replay, demo) leaves written
        return res

    def notify_at(self) -> datetime | None:
        d = self.engine.next_idle_deadline()
        if (self.dirty or self.final) and self.usage is not None and (d is None or self.usage.due() < d):
            d = self.usage.due()
        return datetime.fromtimestamp(d, UTC) if d is not None else None

    def snapshot(self) -> bytes:
        # Bytewax asks every epoch for every shard, recovery or not. Without recovery the
        # answer is thrown away, and pickling all shards' state would stall the worker.
        if not self.snapshots:
            return b""
        if self.store is not None:
            self.store.drain()  # a snapshot must not remember an id the store does not
        if self.usage is not None:
            # Nor a state the read model does not show: the dirty marks (and `final`) are not
            # in the snapshot, so a restart from it would never write them.
            if self.dirty or self.final:
                self.usage.round(time.time(), force=True)
            self.usage.flush()
        # A pickle is an immutable copy and several times cheaper than deepcopy.
        return pickle.dumps(self.engine.state(), protocol=pickle.HIGHEST_PROTOCOL)


class _RatingPartition(StatelessSinkPartition[tuple[str, ShardOut]]):
    """Settles every shard's lines of a write in one register call, writes them as pending,
    produces, flushes, and then confirms them: Redis first, Kafka second."""

    def __init__(self, outbox: KafkaOutbox, topics: Topics, register: EmissionRegister | None, stats: Stats) -> None:
        self.outbox, self.rated_topic, self.credits_topic = outbox, topics.rated, topics.credits
        self.register, self.stats = register, stats

    def write_batch(self, items: list[tuple[str, ShardOut]]) -> None:
        recs: list[Record] = []
        lines: list[RatedUsageLine] = []
        totals: list[Totals] = []
        grants: list[CreditRecord] = []
        for _, o in items:
            recs += o.records
            lines += o.lines
            totals += o.totals
            grants += o.credits
        # Alerts and dead letters go out first, while the lines are settled: an alert never
        # waits for the register (a minute boundary can close every tenant's windows at once).
        self.outbox.produce(recs)
        recs = []
        settled = None
        encode = ENCODER.encode
        if self.register is not None and lines:
            settled = self.register.settle(lines, totals)
            lines = settled.lines
            encode = settled.encoded
            self.stats.resent_lines += settled.resent
        recs += [(self.rated_topic, ln.tenant_id.encode(), encode(ln)) for ln in lines]
        # The credit ledger: each line's draws and returns (ids from the line's, so a line sent
        # again sends them again, harmlessly), and grant-level records settled like lines.
        ledger = [r for ln in lines if ln.credits for r in line_records(ln)]
        commit: dict[str, dict[str, str]] = {}
        if grants:
            if self.register is not None:
                grants, commit = self.register.settle_records(grants)
            else:  # without a register nothing is corrected: a record of nothing is no record
                grants = [r for r in grants if r.amount]
            ledger += grants
        recs += [(self.credits_topic, r.tenant_id.encode(), ENCODER.encode(r)) for r in ledger]
        self.outbox.send("", recs)
        if commit and self.register is not None:
            self.register.commit_records(commit)
        if lines and log.isEnabledFor(logging.DEBUG):
            for ln in lines:
                log.debug(
                    "rated line",
                    extra={"line_id": ln.line_id, "tenant_id": ln.tenant_id, "meter": ln.meter, "window_start": ln.window_start},
                )
        if settled is not None and settled.confirm and self.register is not None:
            self.register.confirm(settled.confirm)

    def close(self) -> None:
        self.outbox.close()
        if self.register is not None:
            self.register.confirm({}, now=True)  # what the last write left to confirm


class RatingSink(DynamicSink[tuple[str, ShardOut]]):
    def __init__(self, kafka: KafkaSettings, topics: Topics, register: EmissionRegister | None, stats: Stats) -> None:
        self.kafka, self.topics, self.register, self.stats = kafka, topics, register, stats

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RatingPartition:
        outbox = KafkaOutbox(self.kafka.config(), shrink={self.topics.dlq: shrink_encoded})
        return _RatingPartition(outbox, self.topics, self.register, self.stats)
