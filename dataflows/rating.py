"""The rating dataflow: usage.events -> validate -> shard -> rate -> alerts / rated / dlq.

Run it with `tallyflow rate` or `python -m bytewax.run "dataflows.rating:get_flow()"`;
both read the TALLYFLOW_* settings. Tenants map to a fixed number of shards (crc32), so
one tenant's state lives in one engine on one worker, and each item is a batch.

Crash safety (with a recovery directory): Bytewax restores input offsets and engine state
from the last snapshot and replays the input after it. What the replay re-derives is made
harmless outside: the long-horizon dedup store knows events by position (a replayed message
is not its own duplicate) and is drained before each snapshot, rated lines are settled against the
emission register (only differences go out), and alerts carry deterministic ids that the
delivery ledger has seen.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Message

from dataflows.kafka_io import KafkaBatchSink, KafkaBatchSource, Record, SinkItem
from operators.catalog_index import CatalogIndex, successor
from operators.deadletters import encode_fitted, shrink_encoded
from operators.periods import iso
from operators.rating import EngineConfig, Out, ShardEngine, TenantState
from operators.sharding import Sharder
from operators.stats import Stats
from operators.validate import Accepted, Validator
from schemas.catalog import CatalogError, load_catalog
from schemas.outputs import ENCODER, DeadLetter, RatedUsageLine
from sinks.dedup_store import DedupStore
from sinks.register import EmissionRegister, Totals
from tallyflow import runtime
from tallyflow.config import Settings, kafka_config, load_settings

log = logging.getLogger(__name__)

# Process-wide counters: every engine and validator in this process adds to them.
STATS = Stats()


def engine_config(s: Settings) -> EngineConfig:
    return EngineConfig(
        window_ms=int(s.window_seconds * 1000),
        allowed_lateness_ms=int(s.allowed_lateness_seconds * 1000),
        grace_ms=int(s.grace_seconds * 1000),
        dedup_horizon_ms=int(s.dedup_horizon_seconds * 1000),
        idle_timeout_s=s.idle_timeout_seconds,
    )


# What a shard emits: encoded alerts and dead letters, and rated lines with their
# period-to-date totals, which the sink settles against the register for all shards at once.
ShardOut = tuple[list[Record], list[RatedUsageLine], list[Totals]]


class _Encoder:
    def __init__(self, s: Settings, *, alerts: bool = True, dead_letters: bool = True) -> None:
        self.s = s
        self.alerts = alerts
        self.dead_letters = dead_letters

    def dead(self, dead: list[DeadLetter]) -> list[Record]:
        """Dead letters keyed by tenant where known, each cut to fit an output message."""
        if not self.dead_letters:
            return []
        cap = self.s.output_max_bytes()
        out: list[Record] = []
        for d in dead:
            key = d.tenant_id.encode() if d.tenant_id and len(d.tenant_id) <= self.s.max_subject_length else None
            out.append((self.s.dlq_topic, key, encode_fitted(d, cap - len(key or b""))))
        return out

    def out(self, o: Out, into: ShardOut) -> None:
        recs = into[0]
        if self.alerts:
            recs += [(self.s.alerts_topic, a.tenant_id.encode(), ENCODER.encode(a)) for a in o.alerts]
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
        into[1].extend(o.lines)
        into[2].extend(o.totals)


class _RatingSinkPartition(StatelessSinkPartition[tuple[str, ShardOut]]):
    """Settles every shard's lines of a write in one register call (two round trips), writes
    them as pending, produces, flushes, and then confirms them: Redis first, Kafka second."""

    def __init__(self, inner: StatelessSinkPartition[SinkItem], s: Settings, register: EmissionRegister | None, stats: Stats) -> None:
        self.inner = inner
        self.s = s
        self.register = register
        self.stats = stats

    def write_batch(self, items: list[tuple[str, ShardOut]]) -> None:
        recs: list[Record] = []
        lines: list[RatedUsageLine] = []
        totals: list[Totals] = []
        for _, (r, ls, ts) in items:
            recs += r
            lines += ls
            totals += ts
        settled = None
        if self.register is not None and lines:
            settled = self.register.settle(lines, totals)
            lines = settled.lines
            self.stats.resent_lines += settled.resent
        topic = self.s.rated_topic
        recs += [(topic, ln.tenant_id.encode(), ENCODER.encode(ln)) for ln in lines]
        self.inner.write_batch([("", recs)])
        if lines and log.isEnabledFor(logging.DEBUG):
            for ln in lines:
                log.debug(
                    "rated line",
                    extra={
                        "line_id": ln.line_id,
                        "tenant_id": ln.tenant_id,
                        "meter": ln.meter,
                        "window_start": ln.window_start,
                        "events": ln.event_count,
                        "revision": ln.revision,
                    },
                )
        if settled is not None and settled.confirm and self.register is not None:
            self.register.confirm(settled.confirm)

    def close(self) -> None:
        self.inner.close()
        if self.register is not None:
            self.register.confirm({}, now=True)  # what the last write left to confirm


class _RatingSink(DynamicSink[tuple[str, ShardOut]]):
    def __init__(self, s: Settings, register: EmissionRegister | None, stats: Stats) -> None:
        self.kafka = KafkaBatchSink(kafka_config(s), shrink={s.dlq_topic: shrink_encoded})
        self.s = s
        self.register = register
        self.stats = stats

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RatingSinkPartition:
        return _RatingSinkPartition(self.kafka.build(step_id, worker_index, worker_count), self.s, self.register, self.stats)


class CatalogWatch:
    """Reloads the catalog file when it changes, without a restart.

    A thread looks at the file every `every_s` and loads and checks a changed one; the
    worker swaps it in before its next batch (nothing needs a catalog between batches). A
    reload that fails its checks is logged and counted, and the catalog in use stays; a bad
    file at start-up stops the process instead (`load_catalog` in build_flow)."""

    def __init__(self, path: str, index: CatalogIndex, every_s: float, stats: Stats) -> None:
        self.path = Path(path)
        self.index = index
        self.every_s = every_s
        self.stats = stats
        self.listeners: list[Callable[[CatalogIndex], None]] = []
        self._ready: CatalogIndex | None = None
        self._lock = threading.Lock()
        self._latest = index
        self._stamp = self._stat()
        if every_s:
            threading.Thread(target=self._watch, name="catalog-watch", daemon=True).start()

    def _stat(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def _watch(self) -> None:
        while True:
            time.sleep(self.every_s)  # the polling period of the file, not a synchronisation
            stamp = self._stat()
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                new = successor(self._latest, load_catalog(self.path))
            except CatalogError as e:
                self.stats.catalog_reload_errors += 1
                log.error("catalog %s changed but cannot be used, keeping the one in use: %s", self.path, e)
                continue
            with self._lock:
                self._latest = self._ready = new
            self.stats.catalog_reloads += 1
            log.warning(
                "catalog %s reloaded: %d tenants, %d pricing versions",
                self.path,
                len(self._latest.tenants),
                len(self._latest.plans_by_version),
            )

    def poll(self) -> None:
        """On the worker, before a batch: swap in a reloaded catalog, if any."""
        if self._ready is None:
            return
        with self._lock:
            new, self._ready = self._ready, None
        if new is not None:
            self.index = new
            for fn in self.listeners:
                fn(new)


# What the validate step sends a shard: its accepted events, and encoded dead letters that
# merely ride along (so the flow needs no branch/merge steps, each a per-item Python call).
ShardItem = tuple[list[Accepted], list[Record]]


class _ShardLogic(StatefulBatchLogic[ShardItem, ShardOut, bytes]):
    def __init__(self, engine: ShardEngine, enc: _Encoder, snapshots: bool, store: DedupStore | None) -> None:
        self.store = store
        self.engine = engine
        self.enc = enc
        self.snapshots = snapshots

    def on_batch(self, values: list[ShardItem]) -> tuple[list[ShardOut], bool]:
        now = time.time()
        received = iso(int(now * 1000))
        res: ShardOut = ([], [], [])
        for batch, passthrough in values:
            res[0].extend(passthrough)
            if batch:
                self.enc.out(self.engine.process(batch, now, received), res)
        return ([res] if res[0] or res[1] else [], self.RETAIN)

    def _emit(self, o: Out) -> tuple[list[ShardOut], bool]:
        res: ShardOut = ([], [], [])
        self.enc.out(o, res)
        return ([res] if res[0] or res[1] else [], self.RETAIN)

    def on_notify(self) -> tuple[list[ShardOut], bool]:
        return self._emit(self.engine.flush_idle(time.time()))

    def on_eof(self) -> tuple[list[ShardOut], bool]:
        if self.store is not None:
            self.store.drain()  # a bounded run (replay, demo) leaves nothing unrecorded
        return self._emit(self.engine.flush_all())

    def notify_at(self) -> datetime | None:
        d = self.engine.next_idle_deadline()
        return datetime.fromtimestamp(d, UTC) if d is not None else None

    def snapshot(self) -> bytes:
        # Bytewax asks every epoch for every shard, recovery or not. Without recovery the
        # answer is thrown away, and pickling all shards' state would stall the worker.
        if not self.snapshots:
            return b""
        if self.store is not None:
            self.store.drain()  # a snapshot must not remember an id the store does not
        # A pickle is an immutable copy and several times cheaper than deepcopy.
        return pickle.dumps(self.engine.state(), protocol=pickle.HIGHEST_PROTOCOL)


def build_flow(
    s: Settings,
    *,
    end_offsets: Mapping[int, int] | None = None,
    start_offsets: Mapping[int, int] | None = None,
    stats: Stats = STATS,
    snapshots: bool = True,
    register: EmissionRegister | None = None,
    alerts: bool = True,
    dead_letters: bool = True,
    accept: Callable[[Accepted], bool] | None = None,
    commit_positions: bool = True,
) -> Dataflow:
    """Wire the rating dataflow. `end_offsets`/`start_offsets` bound the input (demo, tests,
    replays); `snapshots=False` only when the run has no recovery store. A replay passes its
    own `register` (dry runs), `alerts=False`, `dead_letters=False` and an `accept` filter
    (periods, tenants): what it re-derives was already sent, and `commit_positions=False`:
    its read positions are not the live dataflow's."""
    catalog = CatalogIndex.build(load_catalog(s.catalog))
    cfg = engine_config(s)
    limits = s.limits()
    validators = [Validator(catalog, stats, limits)]
    redis_up: Callable[[bool], None] = lambda up: setattr(stats, "redis_up", up)  # noqa: E731
    if register is None and s.emission_register:
        register = EmissionRegister(s.redis_url, int(s.register_ttl_days * 86400), f"{s.redis_prefix}:emitted", on_change=redis_up)
    store = (
        DedupStore(s.redis_url, s.dedup_store_days * 86400, f"{s.redis_prefix}:dedup", on_change=redis_up) if s.dedup_store_days else None
    )
    enc = _Encoder(s, alerts=alerts, dead_letters=dead_letters)
    sharder = Sharder(s.shards)
    engines: list[ShardEngine] = []
    watch = CatalogWatch(s.catalog, catalog, s.catalog_reload_seconds, stats)

    def reloaded(idx: CatalogIndex) -> None:
        validators[0] = Validator(idx, stats, limits)
        for eng in engines:
            eng.cat = idx

    watch.listeners.append(reloaded)

    def validate(msgs: list[Message]) -> list[tuple[str, ShardItem]]:
        """Per consumed batch: accepted events grouped by shard; dead letters ride with one."""
        watch.poll()
        now_ms = int(time.time() * 1000)
        received = iso(now_ms)
        accepted: list[Accepted] = []
        dead: list[DeadLetter] = []
        if msgs:
            m0 = msgs[0]  # a source item holds one partition's messages
            values = ((m.value(), m.offset(), m.timestamp()[1]) for m in msgs)
            validators[0].parse_batch(values, m0.topic() or "", m0.partition() or 0, received, accepted, dead, now_ms)  # type: ignore[arg-type]
        if accept is not None:
            kept = [a for a in accepted if accept(a)]
            stats.records_in -= len(accepted) - len(kept)  # outside the replay: not its input
            accepted = kept
        items: list[tuple[str, ShardItem]] = [(k, (batch, [])) for k, batch in sharder.group(accepted).items()]
        if dead:
            if items:
                items[0][1][1].extend(enc.dead(dead))
            else:
                items.append((sharder(dead[0].tenant_id or ""), ([], enc.dead(dead))))
        return items

    def build_logic(resume: bytes | None) -> _ShardLogic:
        state: dict[str, TenantState] | None = pickle.loads(resume) if resume else None
        engine = ShardEngine.resume(watch.index, cfg, stats, state, store)
        engines.append(engine)
        return _ShardLogic(engine, enc, snapshots, store)

    flow = Dataflow("tallyflow-rating")
    raw = op.input(
        "events",
        flow,
        KafkaBatchSource(
            kafka_config(s),
            s.input_topic,
            batch_size=s.batch_size,
            start_from=s.start_from,
            end_offsets=end_offsets,
            start_offsets=start_offsets,
            group=f"{s.consumer_group_prefix}-rating" if commit_positions else None,
            label="rating",
        ),
    )
    keyed = op.flat_map("validate", raw, validate)
    rated = op.stateful_batch("rate", keyed, build_logic)
    op.output("kafka", rated, _RatingSink(s, register, stats))
    return flow


def recovery_configured(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Whether this `bytewax.run` process has a recovery store (-r or its variable); when in
    doubt, yes: snapshotting needlessly costs time, not snapshotting loses state."""
    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env
    flags = ("-r", "--recovery-directory")
    return bool(env.get("BYTEWAX_RECOVERY_DIRECTORY")) or any(a in flags or a.startswith("--recovery-directory=") for a in argv)


def get_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.rating:get_flow()"`."""
    s = load_settings()
    flow = build_flow(s, snapshots=recovery_configured())
    runtime.started(s, "rating", STATS, redis=lambda: None if STATS.redis_up else "Redis unreachable; input held")
    return flow
