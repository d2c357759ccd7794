"""Crash replays change no line, and the read model ends where reconcile does (issue 18,
items 3 and 4; SPEC §3.3 and §3.8).

* The integration test kills the rating dataflow with SIGKILL many times while traffic of
  1,000 tenants flows across a month end, drains, and then checks that every copy of every
  `line_id` on `usage.rated` is byte-identical, that reconcile's columns (source, rated,
  ERP ledger) equal each other and what the sandbox ERP holds on every key, and that the
  read model equals reconcile's rated totals on every key.
* The unit tests script the crashes those runs hit, deterministically, against a real
  redis-server: a pending rated line re-sent after a restart with another line's body (the
  emission register, alone and driven by the engine), and a restart from a snapshot taken
  while a read-model write was deferred (the rating step's ShardLogic).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import threading
import time
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from connectors.rating import Encoder, ShardLogic, UsagePublisher
from devkit.generator import produce
from devkit.pipeline import RECORDS_IN, LocalPipeline, wait_until
from operators.engine import ShardEngine
from operators.engine_state import EngineConfig
from operators.stats import Stats
from ops.reconcile import rated_and_acknowledged, recount
from runtime.kafka import read_topic
from runtime.settings import StoreSettings, load_settings
from schemas.catalog import load_catalog
from schemas.outputs import RatedUsageLine
from state.read_model import ReadModelWriter, documents
from state.register import EmissionRegister
from tests.support.events import MONTH_END, Harness, ev, hostile
from tests.support.flows import OwnRedis
from tests.support.lines import rated_line
from tests.support.reference import expected
from tests.support.usage import read_model

pytestmark = pytest.mark.integration  # starts the whole pipeline as processes, or a redis-server

D = Decimal
ROOT = Path(__file__).resolve().parents[2]
Key = tuple[str, str, str]  # tenant, meter, period
GRACE_S = 120  # October is final 2 minutes into November: too-late events and a period's last write in the run
ENV = {
    "TALLYFLOW_SHARDS": "8",
    "TALLYFLOW_GRACE_SECONDS": str(GRACE_S),
    "TALLYFLOW_IDLE_TIMEOUT_SECONDS": os.environ.get("TALLYFLOW_TEST_CRASH_IDLE", "0.5"),
    "TALLYFLOW_SNAPSHOT_INTERVAL_SECONDS": os.environ.get("TALLYFLOW_TEST_CRASH_SNAPSHOT", "10"),
    "TALLYFLOW_ERP_BATCH_MAX_LATENCY_SECONDS": "0.3",
    "TALLYFLOW_ERP_RATE_PER_SECOND": "50",
    "TALLYFLOW_RETRY_BASE_SECONDS": "0.05",
    "TALLYFLOW_RETRY_CAP_SECONDS": "0.5",
    "TALLYFLOW_BREAKER_RESET_SECONDS": "0.5",
}
# The load: 1,000 tenants (examples/catalog.yaml) with 2 % duplicates, 2 % late and 1 %
# malformed events across a month end, 48,000 events at 4,000 events/s (12 s of traffic).
EVENTS = int(os.environ.get("TALLYFLOW_TEST_CRASH_EVENTS", "48000"))
RATE = int(os.environ.get("TALLYFLOW_TEST_CRASH_RATE", "4000"))
KILLS = int(os.environ.get("TALLYFLOW_TEST_CRASH_KILLS", "12"))


# -- the whole pipeline, killed under load ------------------------------------------------------


def test_kill_9_rating_under_load_changes_no_line_and_read_model_equals_reconcile() -> None:
    seed = int(os.environ.get("TALLYFLOW_TEST_CRASH_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    print(f"crash schedule seed {seed}")
    problems: list[str] = []  # every check is made and reported, not only the first to fail
    sent: list[bytes] = []
    with LocalPipeline(env=ENV, partitions=3, recovery=True) as lp:
        s = lp.settings
        # Event time runs at 30x: a quiet tenant's window is closed by the idle timeout
        # before its next event in the same minute, which a replay (catching up, never idle)
        # puts in the window instead. The month ends halfway; October is final before the end.
        spec = hostile(EVENTS, 1000, seed, MONTH_END + timedelta(minutes=17), timedelta(minutes=EVENTS / RATE / 2), rate=RATE)
        for name in ("rate", "alerts", "erp"):
            lp.start(name)
        args = (s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog))
        gen = threading.Thread(target=produce, args=args, kwargs={"record": sent}, daemon=True)
        gen.start()
        # SIGKILL while traffic flows, each time at a random moment after the restarted
        # process has caught up with the input: a live process closes quiet tenants' windows
        # on the idle timeout, which the next replay does not (a kill during start-up or
        # catch-up replays nothing new).
        for _ in range(KILLS):
            _caught_up(lp)
            time.sleep(rng.uniform(0.2, 1.2))  # a random point to kill at, not a synchronisation
            lp.kill("rate")
            lp.start("rate")
        gen.join(120)
        assert not gen.is_alive() and len(sent) == EVENTS

        # Reconcile's source column: the whole input recounted, as the independent model has it.
        source, stats = recount(s)
        want = _nonzero(source.quantity), _nonzero(source.amount)
        ref = expected(sent, yaml.safe_load((ROOT / "examples" / "catalog.yaml").read_text()), GRACE_S)
        if stats.records_in != EVENTS or want != (_nonzero(ref.quantity), _nonzero(ref.amount)):
            problems.append(f"recount read {stats.records_in:,} of {EVENTS:,} records: {_diff(want, (ref.quantity, ref.amount))}")

        # Drained: the ERP sandbox holds the recounted totals on every key.
        try:
            wait_until(lambda: _sandbox_erp(lp) == want, 20, "the ERP sandbox to hold the recounted totals")
        except TimeoutError:
            problems.append(f"ERP sandbox vs source, after 20 s: {_diff(_sandbox_erp(lp), want)}")

        # 1. Every copy of a line id on usage.rated is the same bytes.
        copies: dict[str, set[bytes]] = defaultdict(set)
        records = 0
        for v in read_topic(s.kafka.config(), s.topics.rated):
            copies[msgspec.json.decode(v, type=RatedUsageLine).line_id].add(v)
            records += 1
        differing = {i: sorted(vs) for i, vs in copies.items() if len(vs) > 1}
        print(f"usage.rated: {records:,} records, {len(copies):,} line ids, {len(differing):,} of them with differing copies")
        if differing:
            erp_items = lp.sandbox.items("erp")
            detail = [(i, [v.decode() for v in vs], "ERP holds", erp_items.get(i)) for i, vs in list(differing.items())[:3]]
            problems.append(f"{len(differing)} line id(s) on usage.rated with differing copies: {detail}")

        # 2. Reconcile's three columns equal each other and the sandbox ERP, per key.
        conflicts: list[str] = []
        rated, erp = rated_and_acknowledged(s, with_erp=True, conflicts=conflicts)
        assert erp is not None
        if sorted(conflicts) != sorted(differing):
            problems.append(f"reconcile names {len(conflicts)} conflicting line id(s), the topic holds {len(differing)}")
        columns = {
            "rated": (_nonzero(rated.quantity), _nonzero(rated.amount)),
            "erp ledger": (_nonzero(erp.quantity), _nonzero(erp.amount)),
            "sandbox ERP": _sandbox_erp(lp),
        }
        for name, col in columns.items():
            if col != want:
                problems.append(f"reconcile: {name} vs source: {_diff(col, want)}")

        # 3. The read model equals reconcile's rated totals on every key (SPEC §3.8).
        want_rm = columns["rated"]
        try:
            wait_until(lambda: _read_model(lp) == want_rm, 10, "the read model to equal reconcile's rated totals")
        except TimeoutError:
            got = _read_model(lp)
            problems.append(f"read model vs reconcile rated: {_diff(got, want_rm)}; vs source: {_diff(got, want)}")
        assert not problems, f"seed {seed}, logs in {lp.logdir}:\n" + "\n".join(problems)


def _caught_up(lp: LocalPipeline) -> None:
    """Until the rating process has taken input and its consumer lag is under two batches
    (its replay is done), or 20 s (the kill then lands in the replay: still a crash)."""

    def caught_up() -> bool:
        try:
            m = lp.metrics()
        except RuntimeError as e:  # the restart lost its metrics port to another process on the machine
            if "Address already in use" not in str(e):
                raise
            lp.start("rate")
            return False
        lag = sum(v for k, v in m.items() if k.startswith("tallyflow_consumer_lag_messages"))
        return m.get(RECORDS_IN, 0) > 0 and lag < 2 * lp.settings.kafka.batch_size

    with contextlib.suppress(TimeoutError):
        wait_until(caught_up, 20, "the rating dataflow to catch up")


def _nonzero(d: dict[Key, Decimal]) -> dict[Key, Decimal]:
    return {k: v for k, v in d.items() if v}


def _sandbox_erp(lp: LocalPipeline) -> tuple[dict[Key, Decimal], dict[Key, Decimal]]:
    qty: dict[Key, Decimal] = defaultdict(Decimal)
    amt: dict[Key, Decimal] = defaultdict(Decimal)
    for it in lp.sandbox.items("erp").values():
        k = (it["tenant_id"], it["meter"], it["period"])
        qty[k] += D(it["quantity"])
        amt[k] += D(it["amount"])
    return _nonzero(qty), _nonzero(amt)


def _read_model(lp: LocalPipeline) -> tuple[dict[Key, Decimal], dict[Key, Decimal]]:
    docs = read_model(lp.settings).values()
    qty = {(d.tenant_id, m.meter, d.period): m.quantity for d in docs for m in d.meters.values() if m.quantity}
    amt = {(d.tenant_id, m.meter, d.period): m.amount for d in docs for m in d.meters.values() if m.amount}
    return qty, amt


Row = tuple[Key, Decimal | None, Decimal | None, Decimal | None, Decimal | None]


def _diff(got: tuple[dict[Key, Decimal], dict[Key, Decimal]], want: tuple[dict[Key, Decimal], dict[Key, Decimal]]) -> list[Row]:
    """(key, got quantity, want quantity, got amount, want amount) where they differ."""
    keys = sorted({*got[0], *want[0], *got[1], *want[1]})
    rows = [(k, got[0].get(k), want[0].get(k), got[1].get(k), want[1].get(k)) for k in keys]
    return [r for r in rows if r[1] != r[2] or r[3] != r[4]][:20]


# -- the same crash, scripted: a pending line sent again after a restart ------------------------
#
# Lines are written to the emission register as pending before they are produced and are
# un-pended with the *next* write, so a SIGKILL leaves the last write's lines pending; the
# next process produces them again under their own ids. A process that does not know a
# register key settles its first lines against "never emitted" (sequence 1, 2, ...): when
# the replay re-derives the key's lines from its first, those are the ids the dead process
# used, and when the replay's line differs (here: the live process closed the window on its
# idle timeout, the replay, catching up, did not), the compare-and-set conflict that follows
# re-sends the pending line with the body the replay's first attempt encoded under that id.


def _store(r: OwnRedis) -> StoreSettings:
    return StoreSettings(redis_url=f"redis://127.0.0.1:{r.port}/0", redis_prefix="crash-replays")


def _copies(topic: list[bytes]) -> dict[str, set[bytes]]:
    out: dict[str, set[bytes]] = defaultdict(set)
    for v in topic:
        out[msgspec.json.decode(v, type=RatedUsageLine).line_id].add(v)
    return out


def test_a_pending_line_sent_again_after_a_restart_keeps_its_bytes(own_redis: OwnRedis) -> None:
    st = _store(own_redis)
    # The live process: the key's first window closed early with 3 calls; settled (pending),
    # produced and flushed; its confirmation waits for the next write, which never comes.
    live = EmissionRegister(st)
    first = live.settle([rated_line(line_id="w0", quantity="3", amount="0.30", event_count=3)], [(D(3), D("0.30"), 3)])
    topic = [first.encoded(ln) for ln in first.lines]
    live.confirm(first.confirm)
    # SIGKILL. The replay closes the same window with 5 calls.
    replay = EmissionRegister(st)
    again = replay.settle([rated_line(line_id="w0", quantity="5", amount="0.50", event_count=5)], [(D(5), D("0.50"), 5)])
    topic += [again.encoded(ln) for ln in again.lines]
    assert again.resent == 1 and again.lines[0].line_id == first.lines[0].line_id
    assert again.encoded(again.lines[0]) == topic[0], "the re-sent pending line must be the bytes the dead process produced"
    assert all(len(vs) == 1 for vs in _copies(topic).values())


def test_a_pending_line_the_dead_process_never_produced_is_billed_once(own_redis: OwnRedis) -> None:
    """SIGKILL between the register write and the Kafka flush: the line is only in Redis, and
    what the next process produces is all the ERP ever gets."""
    st = _store(own_redis)
    EmissionRegister(st).settle([rated_line(line_id="w0", quantity="3", amount="0.30", event_count=3)], [(D(3), D("0.30"), 3)])
    replay = EmissionRegister(st)
    again = replay.settle([rated_line(line_id="w0", quantity="5", amount="0.50", event_count=5)], [(D(5), D("0.50"), 5)])
    erp: dict[str, RatedUsageLine] = {}
    for ln in again.lines:
        erp.setdefault(ln.line_id, msgspec.json.decode(again.encoded(ln), type=RatedUsageLine))
    assert sum(ln.quantity for ln in erp.values()) == 5, "the ERP must hold the 5 calls the replay rated"


def test_a_replay_that_closes_a_window_otherwise_changes_no_line_and_bills_exactly(own_redis: OwnRedis) -> None:
    """The engine and the register as the rating dataflow drives them, with the crash scripted."""
    st = _store(own_redis)
    calls = [ev(at=timedelta(seconds=10), id="a"), ev(at=timedelta(seconds=40), id="b"), ev(at=timedelta(seconds=65), id="c")]
    # The live process: call a, then 30 s of wall clock without acme: the idle timeout
    # closes acme's 12:00 window with a alone (the snapshot to resume from predates a).
    live, reg = Harness(EngineConfig(idle_timeout_s=30)), EmissionRegister(st)
    live.feed(calls[0], now=1000.0)
    idle = live.engine.flush_idle(1030.0)
    assert [ln.event_count for ln in idle.lines] == [1]
    settled = reg.settle(idle.lines, idle.totals)
    topic = [settled.encoded(ln) for ln in settled.lines]
    reg.confirm(settled.confirm)  # recorded with the next write...
    # ...but SIGKILL comes first. The replay reads a, b and c in one batch: the 12:00 window
    # holds a and b, and c closes it.
    replay, reg = Harness(EngineConfig(idle_timeout_s=30)), EmissionRegister(st)
    out = replay.feed(*calls, now=2000.0)
    assert [ln.event_count for ln in out.lines] == [2]
    settled = reg.settle(out.lines, out.totals)
    topic += [settled.encoded(ln) for ln in settled.lines]
    out = replay.flush()  # the end of the input closes the 12:01 window (c)
    settled = reg.settle(out.lines, out.totals)
    topic += [settled.encoded(ln) for ln in settled.lines]

    copies = _copies(topic)
    differing = {i: sorted(v.decode() for v in vs) for i, vs in copies.items() if len(vs) > 1}
    assert not differing, f"a line id on usage.rated with two contents: {differing}"
    # What each reader makes of the topic: reconcile keeps the last copy of an id, the ERP
    # (and the delivery ledger) the first. Both must be the 3 calls that were made.
    last: dict[str, RatedUsageLine] = {}
    first_seen: dict[str, RatedUsageLine] = {}
    for v in topic:
        ln = msgspec.json.decode(v, type=RatedUsageLine)
        last[ln.line_id] = ln
        first_seen.setdefault(ln.line_id, ln)
    assert sum(ln.quantity for ln in first_seen.values()) == 3, "what the ERP holds"
    assert sum(ln.quantity for ln in last.values()) == 3, "what reconcile counts as rated"


# -- the read model after a restart: what the snapshot holds, the read model must show ----------
#
# The read model is written per interval (and within a budget) for the tenants marked dirty
# since the last write; the dirty marks (and the periods forgotten since, `final`) live in
# the ShardLogic, not in its snapshot. A snapshot taken while a write is deferred, and a
# SIGKILL before that write, leave a state that the restarted process holds but never
# writes: nothing marks the tenant again unless it has more input or open windows.


def test_a_restart_from_a_snapshot_leaves_no_figure_behind_in_the_read_model(own_redis: OwnRedis) -> None:
    s = load_settings({}, redis_url=f"redis://127.0.0.1:{own_redis.port}/0", redis_prefix="crash-replays")
    h = Harness(EngineConfig(idle_timeout_s=0.05))
    enc = Encoder(s.topics, s.kafka.output_max_bytes(), s.limits.max_subject_length)
    stats = Stats()

    def logic(state: bytes | None, interval_s: float) -> ShardLogic:
        engine = ShardEngine.resume(h.validator, h.cfg, stats, pickle.loads(state) if state else None)
        return ShardLogic(engine, enc, True, None, UsagePublisher(ReadModelWriter(s.stores), interval_s, stats))

    def batch(*values: bytes) -> list[tuple[list[Any], str, int, list[Any]]]:
        """A shard's item as intake hands it over: routed events of one partition."""
        return [(h.route(*values), "usage.events", 0, [])]

    def calls() -> list[Decimal]:
        return [v.quantity for _, f in documents(s.stores) for m in f.meters for v in m.versions]

    live = logic(None, 5.0)  # an interval that outlasts the scripted crash
    live.on_batch(batch(ev(at=timedelta(seconds=1)), ev(at=timedelta(seconds=2))))  # the first write goes at once
    assert live.usage is not None
    live.usage.flush()
    live.on_batch(batch(ev(at=timedelta(seconds=3))))  # the next waits for the interval
    time.sleep(0.1)  # acme goes quiet: its window closes on the idle timeout
    out, _ = live.on_notify()
    assert [ln.event_count for o in out for ln in o.lines] == [3]  # billed: 3 calls
    snapshot = live.snapshot()  # the epoch ends and is committed ...
    # ... and SIGKILL comes before the deferred write. The restarted process resumes from that
    # snapshot; acme sends nothing more.
    again = logic(snapshot, 0.2)
    time.sleep(0.3)
    again.on_notify()
    assert again.usage is not None
    again.usage.flush()
    assert calls() == [3], "the read model must show what the bill holds once the input is drained"
