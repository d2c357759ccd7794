"""Recovery pieces against real redis-server and broker: the emission register, the
long-horizon dedup store (and what happens while Redis is away), replay with a pricing fix,
and a catalog change picked up mid-stream."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml
from bytewax._bytewax import cli_main
from confluent_kafka import Producer

from dataflows import FLOWS
from dataflows.rating import Bounds, build_flow
from devkit.pipeline import scrape, wait_until
from devkit.stack import LocalStack, free_port, redis_binary
from operators.stats import Stats
from ops import dlq
from ops.replay import replay
from runtime.kafka import log_ends, read_topic
from runtime.settings import Settings, to_env
from schemas.outputs import DeadLetter, RatedUsageLine, ThresholdAlert
from schemas.records import Accepted
from state.dedup_store import DedupStore
from state.register import EmissionRegister
from tests.helpers import CATALOG, UPGRADE_AT, ev

D = Decimal
MIN = timedelta(minutes=1)


def _line(qty: int, amount: str, *, events: int, revision: int = 0, start: str = "2026-03-10T12:00:00.000Z") -> RatedUsageLine:
    return RatedUsageLine(
        line_id="engine-id",
        tenant_id="acme",
        erp_customer_id="ERP-1",
        contract_id="C-1",
        product_code="CALLS",
        meter="calls",
        quantity=D(qty),
        amount=D(amount),
        currency="USD",
        window_start=start,
        window_end=start,
        period="2026-03",
        pricing_version="basic:v1",
        event_count=events,
        first_event_time=start,
        last_event_time=start,
        revision=revision,
    )


def test_register_settles_a_divergent_replay_by_difference(stack: LocalStack, settings: Settings) -> None:
    prefix = settings.stores
    reg = EmissionRegister(prefix)
    first = reg.settle([_line(12, "0.20", events=12)], [(D(12), D("0.20"), 12)])
    assert [(ln.quantity, ln.amount, ln.revision) for ln in first.lines] == [(12, D("0.20"), 0)]
    # The process dies before the Kafka flush is confirmed: the next one sends the line again
    # (same id) with whatever it emits for that key, and a replay that re-derives the same
    # totals adds nothing.
    again = EmissionRegister(prefix)
    same = again.settle([_line(12, "0.20", events=12)], [(D(12), D("0.20"), 12)])
    assert [ln.line_id for ln in same.lines] == [first.lines[0].line_id] and same.resent == 1
    again.confirm(same.confirm, now=True)
    # A replay that saw the window close with 15 events instead: a correction of +3.
    third = EmissionRegister(prefix)
    diff = third.settle([_line(15, "0.50", events=15)], [(D(15), D("0.50"), 15)])
    assert diff.resent == 0
    assert [(ln.quantity, ln.amount, ln.event_count, ln.revision) for ln in diff.lines] == [(3, D("0.30"), 3, 1)]
    assert diff.lines[0].line_id != first.lines[0].line_id
    assert third.totals([third.key(diff.lines[0])]) == {third.key(diff.lines[0]): (D(15), D("0.50"), 15)}
    # A dry run computes the same way and writes nothing.
    dry = third.settle([_line(16, "0.60", events=16)], [(D(16), D("0.60"), 16)], dry_run=True)
    assert [ln.quantity for ln in dry.lines] == [1] and dry.confirm == {}
    assert third.totals([third.key(diff.lines[0])])[third.key(diff.lines[0])][0] == 15


def test_register_history_skips_replayed_states_only_until_the_replay_diverges(stack: LocalStack, settings: Settings) -> None:
    prefix = settings.stores
    live = EmissionRegister(prefix)
    # Before the crash: window 1 closed with events a, b; window 2 with c.
    s1 = live.settle([_line(2, "0", events=2)], [(D(2), D(0), 2)])
    s2 = live.settle([_line(1, "0", events=1, start="2026-03-10T12:01:00.000Z")], [(D(3), D(0), 3)])
    live.confirm(s1.confirm, now=True)
    live.confirm(s2.confirm, now=True)
    # A replay that repeats history emits nothing...
    same = EmissionRegister(prefix)
    assert same.settle([_line(2, "0", events=2)], [(D(2), D(0), 2)]).lines == []
    # ...but one whose window 1 closed early with a alone diverges: -1 now, and when b comes
    # as a correction (back at the old state (2, 0, 2)) it must go out, not be taken for history.
    replay = EmissionRegister(prefix)
    out = [replay.settle([_line(1, "0", events=1)], [(D(1), D(0), 1)])]
    out.append(replay.settle([_line(1, "0", events=1, revision=1)], [(D(2), D(0), 2)]))
    out.append(replay.settle([_line(1, "0", events=1, start="2026-03-10T12:01:00.000Z")], [(D(3), D(0), 3)]))
    sent = [ln for o in out for ln in o.lines]
    assert [ln.quantity for ln in sent] == [-2, 1, 1]
    assert s1.lines[0].quantity + s2.lines[0].quantity + sum(ln.quantity for ln in sent) == 3
    for o in out:
        replay.confirm(o.confirm, now=True)
    # A later process replaying the new lineage skips its states, and not the abandoned one's.
    after = EmissionRegister(prefix)
    assert after.settle([_line(1, "0", events=1)], [(D(1), D(0), 1)]).lines == []


def test_register_rereads_a_key_another_process_wrote(stack: LocalStack, settings: Settings) -> None:
    """The live process caches its keys; a replay writing one meanwhile must not make the
    live process bill the same usage again."""
    prefix = settings.stores
    live = EmissionRegister(prefix)
    first = live.settle([_line(2, "0.20", events=2)], [(D(2), D("0.20"), 2)])
    live.confirm(first.confirm, now=True)
    # A replay at the fixed price re-rates windows 1 and 2 (the live engine's window 2 is open).
    replay = EmissionRegister(prefix)
    fix = replay.settle([_line(5, "0.60", events=5)], [(D(5), D("0.60"), 5)], correction=True)
    replay.confirm(fix.confirm, now=True)
    assert [(ln.quantity, ln.amount, ln.revision) for ln in fix.lines] == [(3, D("0.40"), 1)]
    # The live engine (restarted with the fixed catalog) closes window 2: nothing is left to bill.
    second = live.settle([_line(3, "0.40", events=3, start="2026-03-10T12:01:00.000Z")], [(D(5), D("0.60"), 5)])
    assert second.lines == []
    third = live.settle([_line(1, "0.12", events=1, start="2026-03-10T12:02:00.000Z")], [(D(6), D("0.72"), 6)])
    assert [(ln.quantity, ln.amount) for ln in third.lines] == [(1, D("0.12"))]
    assert sum(ln.amount for part in (first, fix, second, third) for ln in part.lines) == D("0.72")


def test_register_takes_totals_from_before_it_existed_as_emitted(stack: LocalStack, settings: Settings) -> None:
    reg = EmissionRegister(settings.stores)
    out = reg.settle([_line(2, "0.20", events=2, revision=0)], [(D(10), D("1.00"), 10)])
    assert [(ln.quantity, ln.amount, ln.event_count, ln.revision) for ln in out.lines] == [(2, D("0.20"), 2, 0)]


def _acc(tenant: str, key: str, partition: int, offset: int) -> Accepted:
    return Accepted(tenant, "basic:v1", key, key, 0, [], b"", "t", partition, offset, None)


def test_dedup_store_knows_positions_and_expires_ids(stack: LocalStack, settings: Settings) -> None:
    store = DedupStore(settings.stores)
    items = [_acc("acme", "svc/1", 0, 10), _acc("acme", "svc/2", 0, 11), _acc("acme", "svc/1", 1, 99)]
    assert store.duplicates(items) == {2}  # a copy within the batch
    # Read again from the same positions (crash replay, backfill): not duplicates of themselves.
    assert store.duplicates(items[:2]) == set()
    assert store.duplicates([_acc("bolt", "svc/1", 2, 1), _acc("acme", "svc/2", 2, 2)]) == {1}  # per tenant
    # Recorded in the background, then asked about: known once drained (duplicates drains).
    store.record([_acc("acme", f"bg/{i}", 0, 100 + i) for i in range(500)])
    assert store.duplicates([_acc("acme", "bg/7", 3, 1), _acc("acme", "bg/8", 0, 108), _acc("acme", "bg/x", 0, 1)]) == {0}
    big = msgspec.structs.replace(_acc("acme", "big/1", 0, 5), index=70_000)
    assert store.duplicates([big]) == set() and store.duplicates([msgspec.structs.replace(big, index=70_001)]) == {0}
    buckets = list(store.r.scan_iter(f"{settings.stores.redis_prefix}:dedup:*"))
    assert buckets and all(7 * 86400 < store.r.ttl(b) <= 8 * 86400 for b in buckets)


def _produce(s: Settings, values: list[bytes], key: bytes = b"acme") -> dict[int, int]:
    """Produce to partition 0; return the exclusive end offsets."""
    ends: dict[int, int] = {}
    p = Producer({"bootstrap.servers": s.kafka.brokers})
    for v in values:
        p.produce(s.topics.input, v, key, partition=0, on_delivery=lambda err, m: ends.__setitem__(m.partition(), m.offset() + 1))
    p.flush()
    return ends


def _run(s: Settings, ends: dict[int, int], start: dict[int, int] | None = None) -> Stats:
    stats = Stats()
    cli_main(build_flow(s, bounds=Bounds(ends, start), stats=stats, snapshots=False))
    return stats


def _lines(s: Settings) -> list[RatedUsageLine]:
    return [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated)]


@pytest.fixture
def small(settings: Settings, tmp_path: Path) -> Settings:
    """Settings with the small test catalog (tenants acme, bolt, late-co) in a file of its own."""
    path = tmp_path / "catalog.yaml"
    _write_catalog(path, CATALOG)
    return settings.replace(catalog=str(path))


def test_a_copy_older_than_the_memory_window_is_still_a_duplicate(small: Settings) -> None:
    """A fresh process (no recovery state, empty memory) reads copies of events rated by an
    earlier one: only the Redis store can know them."""
    settings = small
    originals = [ev(at=i * MIN, id=f"orig-{i}") for i in range(20)]
    ends = _produce(settings, originals)
    first = _run(settings, ends)
    assert (first.accepted, first.duplicates) == (20, 0)
    more = _produce(settings, [*originals[:5], ev(at=25 * MIN, id="new")])
    second = _run(settings, more, start=ends)
    assert (second.records_in, second.accepted, second.duplicates) == (6, 1, 5)
    # Without the store the same run counts them again: this is what it protects.
    third = _run(settings.replace(dedup_store_days=0), more, start=ends)
    assert third.duplicates == 0


class _Redis:
    """A redis-server of the test's own, to take away and bring back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.p = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: _pings(self.port), 10, "redis-server to answer")

    def stop(self) -> None:
        assert self.p is not None
        self.p.kill()
        self.p.wait(10)


def _pings(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def own_redis() -> Iterator[_Redis]:
    r = _Redis()
    r.start()
    yield r
    if r.p is not None and r.p.poll() is None:
        r.stop()


def _start_rating(s: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", FLOWS["rate"]],
        env={**os.environ, **to_env(s), **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_without_redis_the_flow_stops_pulling_says_so_and_resumes(small: Settings, own_redis: _Redis, tmp_path: Path) -> None:
    port = free_port()
    s = small.replace(redis_url=f"redis://127.0.0.1:{own_redis.port}/0", metrics_port=port, batch_size=100)
    proc = _start_rating(s, tmp_path / "rate.log")
    try:
        _produce(s, [ev(at=i * MIN / 10, id=f"a{i}") for i in range(300)])
        wait_until(lambda: scrape(port).get("tallyflow_records_total{outcome=accepted}") == 300, 60, "300 events accepted")
        own_redis.stop()
        _produce(s, [ev(at=30 * MIN + i * MIN / 100, id=f"b{i}") for i in range(5000)])
        wait_until(lambda: scrape(port).get("tallyflow_redis_up") == 0, 30, "the flow to report Redis down")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503 and "Redis unreachable" in ready.json()["problems"][0]
        log = tmp_path / "rate.log"
        wait_until(lambda: log.read_text().count("Redis unreachable") >= 3, 30, "three logged retries")
        # Input stops once the bounded queue of ids to record is full: the rest waits in Kafka.
        held = scrape(port)["tallyflow_records_total{outcome=in}"]
        wait_until(lambda: log.read_text().count("Redis unreachable") >= 5, 30, "two more retries")
        assert scrape(port)["tallyflow_records_total{outcome=in}"] == held < 5300
        own_redis.start()
        wait_until(lambda: scrape(port).get("tallyflow_records_total{outcome=accepted}") == 5300, 60, "the rest after Redis returns")
        assert scrape(port)["tallyflow_redis_up"] == 1
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        assert "Redis is back" in log.read_text()
    finally:
        proc.kill()
        proc.wait(10)


def _write_catalog(path: Path, catalog: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(catalog))
    tmp.replace(path)  # atomic, as a ConfigMap update is


def test_replay_after_a_pricing_fix_sends_only_corrections(settings: Settings, tmp_path: Path) -> None:
    cat_path = tmp_path / "catalog.yaml"
    _write_catalog(cat_path, CATALOG)
    s = settings.replace(catalog=str(cat_path))
    events = [ev(at=i * MIN, id=f"c{i}") for i in range(30)] + [ev(at=3 * MIN, id="c3")]  # one duplicate
    events += [ev("late-co", at=i * MIN, id=f"l{i}") for i in range(12)]
    ends = _produce(s, events)
    stats = _run(s, ends)
    assert (stats.accepted, stats.duplicates) == (42, 1)
    before = _lines(s)
    assert sum(ln.amount for ln in before) == (30 - 10) * D("0.10") + (12 - 10) * D("0.10")

    # The unit price of calls was wrong: 0.10 should have been 0.12.
    fixed = copy.deepcopy(CATALOG)
    fixed["plans"][0]["meters"]["calls"]["price"]["unit_price"] = "0.12"
    _write_catalog(cat_path, fixed)
    changes, _ = replay(s, {"2026-03"}, {"acme"}, dry_run=True)
    assert {(k[0], k[1], c.quantity, c.amount, c.events) for k, c in changes.items()} == {("acme", "calls", 0, D("0.40"), 0)}
    assert len(_lines(s)) == len(before)  # a dry run writes nothing

    changes, rstats = replay(s, {"2026-03"}, {"acme"}, dry_run=False)
    assert (rstats.accepted, rstats.duplicates) == (30, 1)  # the duplicate is still one
    assert {k[0]: c.amount for k, c in changes.items()} == {"acme": D("0.40")}
    after = _lines(s)
    corrections = after[len(before) :]
    assert corrections and all(ln.revision >= 1 and ln.tenant_id == "acme" for ln in corrections)
    assert len({ln.line_id for ln in after}) == len(after)
    acme = [ln for ln in after if ln.tenant_id == "acme"]
    assert (sum(ln.quantity for ln in acme), sum(ln.amount for ln in acme)) == (30, (30 - 10) * D("0.12"))
    assert sum(ln.event_count for ln in acme) == 30
    # Replaying again changes nothing.
    changes, _ = replay(s, {"2026-03"}, {"acme"}, dry_run=False)
    assert changes == {} and len(_lines(s)) == len(after)


def test_catalog_change_mid_stream_onboards_and_upgrades_without_restart(settings: Settings, tmp_path: Path) -> None:
    cat_path = tmp_path / "catalog.yaml"
    v1 = copy.deepcopy(CATALOG)
    v1["tenants"] = [t for t in v1["tenants"] if t["tenant_id"] == "acme"]
    _write_catalog(cat_path, v1)
    port = free_port()
    s = settings.replace(catalog=str(cat_path), metrics_port=port, catalog_reload_seconds=0.2, idle_timeout_seconds=1)
    proc = _start_rating(s, tmp_path / "rate.log")
    try:
        before = UPGRADE_AT - timedelta(hours=1)
        _produce(s, [ev(at=before + i * MIN, id=f"p{i}") for i in range(11)] + [ev("newco", at=before, id="n0")])
        wait_until(lambda: scrape(port).get("tallyflow_records_total{outcome=in}") == 12, 60, "the first 12 events")

        # Onboard newco and move acme to plus from UPGRADE_AT; a broken edit first is refused.
        bad = copy.deepcopy(v1)
        bad["plans"][0]["meters"]["calls"]["included"] = 5  # basic:v1 changed in place
        _write_catalog(cat_path, bad)
        wait_until(lambda: scrape(port).get("tallyflow_catalog_reloads_total{outcome=error}") == 1, 30, "the bad edit refused")
        v2 = copy.deepcopy(v1)
        v2["tenants"][0]["plan_changes"] = [{"plan": "plus", "effective_from": UPGRADE_AT.isoformat()}]
        v2["tenants"].append({**v2["tenants"][0], "tenant_id": "newco", "plan_changes": [], "crm_account_id": "CRM-9"})
        _write_catalog(cat_path, v2)
        wait_until(lambda: scrape(port).get("tallyflow_catalog_reloads_total{outcome=ok}") == 1, 30, "the catalog reload")

        after = UPGRADE_AT + timedelta(hours=1)
        _produce(s, [ev(at=after + i * MIN, id=f"q{i}") for i in range(70)] + [ev("newco", at=after, id="n1")])
        wait_until(lambda: scrape(port).get("tallyflow_open_windows") == 0 and len(_lines(s)) > 0 and _rated(s) == 82, 60, "all rated")
    finally:
        proc.kill()
        proc.wait(10)
    lines = _lines(s)
    by_version: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
    for ln in lines:
        q, a = by_version.get((ln.tenant_id, ln.pricing_version), (D(0), D(0)))
        by_version[(ln.tenant_id, ln.pricing_version)] = (q + ln.quantity, a + ln.amount)
    # From the effective instant acme is rated under plus (100 included, 0.05): 70 calls are free.
    assert by_version == {("acme", "basic:v1"): (11, D("0.10")), ("acme", "plus:v2"): (70, 0), ("newco", "basic:v1"): (1, 0)}
    alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
    acme = [(a.plan_id, a.level) for a in alerts if a.tenant_id == "acme"]
    assert acme == [("basic", "80%"), ("basic", "100%"), ("plus", "80%")]  # plus's own thresholds, from the upgrade on
    dead = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.brokers, s.topics.dlq)]
    assert [(d.reason, d.event_id) for d in dead] == [("unknown_tenant", "n0")]  # before onboarding only


def _rated(s: Settings) -> int:
    return sum(ln.event_count for ln in _lines(s))


def test_dead_letters_drain_once_the_catalog_knows_the_tenant(small: Settings) -> None:
    """The runbook's DLQ drain: a tenant that was not onboarded in time is added to the
    catalog, its dead letters are re-driven and rated; a second re-drive changes nothing."""
    s = small
    ends = _produce(s, [*(ev("newco", at=i * MIN, id=f"n{i}") for i in range(8)), b"{not json", ev(at=MIN, id="a1")])
    first = _run(s, ends)
    assert (first.accepted, dict(first.dead)) == (1, {"unknown_tenant": 8, "invalid_json": 1})
    dead = dlq.load(s)
    assert dlq.summary(dead)["by_reason"] == {"unknown_tenant": 8, "invalid_json": 1}
    cat = copy.deepcopy(CATALOG)
    cat["tenants"].append(
        {"tenant_id": "newco", "plan": "basic", "crm_account_id": "CRM-9", "erp_customer_id": "ERP-9", "contract_id": "C-9"}
    )
    _write_catalog(Path(s.process.catalog), cat)

    assert dlq.redrive(s, dlq.select(dead, ["unknown_tenant"], [])) == 8
    ends2 = log_ends(s.kafka.brokers, s.topics.input)
    second = _run(s, ends2, start=ends)
    assert (second.records_in, second.accepted, dict(second.dead)) == (8, 8, {})
    assert sum(ln.event_count for ln in _lines(s) if ln.tenant_id == "newco") == 8

    dlq.redrive(s, dlq.select(dead, ["unknown_tenant"], ["newco"]))  # by mistake, again
    third = _run(s, log_ends(s.kafka.brokers, s.topics.input), start=ends2)
    assert (third.accepted, third.duplicates) == (0, 8)
