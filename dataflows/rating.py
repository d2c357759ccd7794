"""The rating dataflow: usage.events -> validate -> shard -> rate -> alerts / rated / dlq.

Run it with `tallyflow rate` or `python -m bytewax.run "dataflows.rating:get_flow()"`;
both read the TALLYFLOW_* settings. Tenants map to a fixed number of shards (crc32), so
one tenant's state lives in one engine on one worker, and each item is a batch. The steps
are in `connectors/rating.py`; what a crash replays and why it is harmless is told there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.kafka_source import KafkaBatchSource
from connectors.rating import Encoder, Intake, RatingSink, ShardLogic, UsagePublisher
from operators.catalog_index import CatalogIndex
from operators.stats import Stats
from runtime import process
from runtime.catalog_watch import CatalogWatch
from runtime.settings import Settings, load_settings
from schemas.catalog import load_catalog
from state.dedup_store import DedupStore
from state.read_model import ReadModelWriter
from state.register import EmissionRegister

# Process-wide counters: every engine and validator in this process adds to them.
STATS = Stats()


@dataclass(frozen=True)
class Bounds:
    """A bounded run (tests, bench, replay) reads [start, end) of each input partition and
    commits no read positions (they are not the live dataflow's)."""

    end_offsets: Mapping[int, int]
    start_offsets: Mapping[int, int] | None = None


@dataclass(frozen=True)
class Replay:
    """What `tallyflow replay` changes: its own register (it settles at the end), a filter
    of the periods and tenants it re-rates, and no alerts or dead letters (already sent)."""

    register: EmissionRegister
    accept: Callable[[str, str, int], bool]  # (tenant, pricing version, event time ms): re-rated


def build_flow(
    s: Settings, *, bounds: Bounds | None = None, stats: Stats = STATS, snapshots: bool = True, replay: Replay | None = None
) -> Dataflow:
    """Wire the rating dataflow; `snapshots=False` only when the run has no recovery store."""
    catalog = CatalogIndex.build(load_catalog(s.process.catalog))
    redis_up: Callable[[bool], None] = lambda up: setattr(stats, "redis_up", up)  # noqa: E731
    register = replay.register if replay else EmissionRegister(s.stores, redis_up) if s.stores.emission_register else None
    store = DedupStore(s.stores, redis_up) if s.stores.dedup_store_days else None
    # A replay re-rates a slice of the input from scratch: its partial state is not the usage.
    usage = (
        UsagePublisher(ReadModelWriter(s.stores, redis_up), s.stores.read_model_interval_seconds, stats)
        if s.stores.read_model and replay is None
        else None
    )
    watch = CatalogWatch(s.process.catalog, catalog, s.process.catalog_reload_seconds, stats)
    enc = Encoder(s.topics, s.kafka.output_max_bytes(), s.limits.max_subject_length, alerts=replay is None, dead_letters=replay is None)
    intake = Intake(watch, s.limits, stats, enc, s.engine.shards)

    flow = Dataflow("tallyflow-rating")
    source = KafkaBatchSource(
        s.kafka,
        s.topics.input,
        label="rating",
        commit_positions=bounds is None,
        end_offsets=bounds.end_offsets if bounds else None,
        start_offsets=bounds.start_offsets if bounds else None,
    )
    keyed = op.flat_map("validate", op.input("events", flow, source), intake)
    rated = op.stateful_batch(
        "rate", keyed, ShardLogic.builder(intake, s.engine, stats, enc, snapshots, store, usage, replay.accept if replay else None)
    )
    op.output("kafka", rated, RatingSink(s.kafka, s.topics, register, stats))
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
    process.refuse_worker_threads("rate")
    s = load_settings()
    flow = build_flow(s, snapshots=recovery_configured())
    process.started(s, "rating", STATS, redis=lambda: None if STATS.redis_up else "Redis unreachable; input held")
    return flow
