"""The rating dataflow: usage.events -> validate -> shard -> rate -> alerts / rated / dlq.

Run it with `tallyflow rate` or `python -m bytewax.run "dataflows.rating:get_flow()"`;
both read the TALLYFLOW_* settings. Tenants map to a fixed number of shards (crc32), so
one tenant's state lives in one engine on one worker, and each item is a batch.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from confluent_kafka import Message

from dataflows.kafka_io import KafkaBatchSink, KafkaBatchSource, Record
from operators.catalog_index import CatalogIndex
from operators.periods import iso
from operators.rating import EngineConfig, Out, ShardEngine, TenantState
from operators.sharding import Sharder
from operators.stats import Stats
from operators.validate import Accepted, Validator
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER, DeadLetter
from tallyflow.config import Settings, kafka_config, load_settings, tune_gc
from tallyflow.metrics import serve as serve_metrics

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


class _Encoder:
    def __init__(self, s: Settings) -> None:
        self.s = s

    def dead(self, dead: list[DeadLetter]) -> list[Record]:
        return [(self.s.dlq_topic, d.tenant_id.encode() if d.tenant_id else None, ENCODER.encode(d)) for d in dead]

    def out(self, o: Out) -> list[Record]:
        s = self.s
        recs: list[Record] = [(s.alerts_topic, a.tenant_id.encode(), ENCODER.encode(a)) for a in o.alerts]
        recs += [(s.rated_topic, ln.tenant_id.encode(), ENCODER.encode(ln)) for ln in o.lines]
        recs += self.dead(o.dead)
        return recs


# What the validate step sends a shard: its accepted events, and encoded dead letters that
# merely ride along (so the flow needs no branch/merge steps, each a per-item Python call).
ShardItem = tuple[list[Accepted], list[Record]]


class _ShardLogic(StatefulBatchLogic[ShardItem, list[Record], bytes]):
    def __init__(self, engine: ShardEngine, enc: _Encoder, snapshots: bool) -> None:
        self.engine = engine
        self.enc = enc
        self.snapshots = snapshots

    def on_batch(self, values: list[ShardItem]) -> tuple[list[list[Record]], bool]:
        now = time.time()
        received = iso(int(now * 1000))
        recs: list[Record] = []
        for batch, passthrough in values:
            recs += passthrough
            if batch:
                recs += self.enc.out(self.engine.process(batch, now, received))
        return ([recs] if recs else [], self.RETAIN)

    def on_notify(self) -> tuple[list[list[Record]], bool]:
        recs = self.enc.out(self.engine.flush_idle(time.time()))
        return ([recs] if recs else [], self.RETAIN)

    def on_eof(self) -> tuple[list[list[Record]], bool]:
        recs = self.enc.out(self.engine.flush_all())
        return ([recs] if recs else [], self.RETAIN)

    def notify_at(self) -> datetime | None:
        d = self.engine.next_idle_deadline()
        return datetime.fromtimestamp(d, UTC) if d is not None else None

    def snapshot(self) -> bytes:
        # Bytewax asks every epoch for every shard, recovery or not. Without recovery the
        # answer is thrown away, and pickling all shards' state would stall the worker.
        if not self.snapshots:
            return b""
        # A pickle is an immutable copy and several times cheaper than deepcopy.
        return pickle.dumps(self.engine.state(), protocol=pickle.HIGHEST_PROTOCOL)


def build_flow(s: Settings, *, end_offsets: Mapping[int, int] | None = None, stats: Stats = STATS, snapshots: bool = True) -> Dataflow:
    """Wire the rating dataflow. `end_offsets` bounds the input (demo, tests, backfills);
    `snapshots=False` only when the run has no recovery store."""
    catalog = CatalogIndex.build(load_catalog(s.catalog))
    cfg = engine_config(s)
    validator = Validator(catalog, stats)
    enc = _Encoder(s)
    sharder = Sharder(s.shards)

    def validate(msgs: list[Message]) -> list[tuple[str, ShardItem]]:
        """Per consumed batch: accepted events grouped by shard; dead letters ride with one."""
        received = iso(int(time.time() * 1000))
        accepted: list[Accepted] = []
        dead: list[DeadLetter] = []
        if msgs:
            m0 = msgs[0]  # a source item holds one partition's messages
            values = ((m.value(), m.offset()) for m in msgs)
            validator.parse_batch(values, m0.topic() or "", m0.partition() or 0, received, accepted, dead)  # type: ignore[arg-type]
        items: list[tuple[str, ShardItem]] = [(k, (batch, [])) for k, batch in sharder.group(accepted).items()]
        if dead:
            if items:
                items[0][1][1].extend(enc.dead(dead))
            else:
                items.append((sharder(dead[0].tenant_id or ""), ([], enc.dead(dead))))
        return items

    def build_logic(resume: bytes | None) -> _ShardLogic:
        state: dict[str, TenantState] | None = pickle.loads(resume) if resume else None
        return _ShardLogic(ShardEngine.resume(catalog, cfg, stats, state), enc, snapshots)

    flow = Dataflow("tallyflow-rating")
    raw = op.input(
        "events",
        flow,
        KafkaBatchSource(kafka_config(s), s.input_topic, batch_size=s.batch_size, start_from=s.start_from, end_offsets=end_offsets),
    )
    keyed = op.flat_map("validate", raw, validate)
    rated = op.stateful_batch("rate", keyed, build_logic)
    op.output("kafka", rated, KafkaBatchSink(kafka_config(s)))
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
    log.info("tallyflow rating settings: %s", s.masked())
    flow = build_flow(s, snapshots=recovery_configured())
    serve_metrics(STATS, s.metrics_port)
    tune_gc()
    return flow
