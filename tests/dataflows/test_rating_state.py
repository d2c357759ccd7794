"""What the rating dataflow keeps beyond one process: duplicates older than memory (the
Redis store), a Redis outage (input held, resumed), and a catalog changed mid-stream."""

from __future__ import annotations

import copy
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec

from devkit.pipeline import scrape, wait_until
from devkit.stack import free_port
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.outputs import DeadLetter, ThresholdAlert
from tests.support.events import CATALOG, UPGRADE_AT, ev
from tests.support.flows import MIN, D, OwnRedis, produce_events, rated_count, rated_lines, run_bounded, start_rating, write_catalog


def test_a_copy_older_than_the_memory_window_is_still_a_duplicate(small: Settings) -> None:
    """A fresh process (no recovery state, empty memory) reads copies of events rated by an
    earlier one: only the Redis store can know them."""
    settings = small
    originals = [ev(at=i * MIN, id=f"orig-{i}") for i in range(20)]
    ends = produce_events(settings, originals)
    first = run_bounded(settings, ends)
    assert (first.accepted, first.duplicates) == (20, 0)
    more = produce_events(settings, [*originals[:5], ev(at=25 * MIN, id="new")])
    second = run_bounded(settings, more, start=ends)
    assert (second.records_in, second.accepted, second.duplicates) == (6, 1, 5)
    # Without the store the same run counts them again: this is what it protects.
    third = run_bounded(settings.replace(dedup_store_days=0), more, start=ends)
    assert third.duplicates == 0


def test_without_redis_the_flow_stops_pulling_says_so_and_resumes(small: Settings, own_redis: OwnRedis, tmp_path: Path) -> None:
    port = free_port()
    s = small.replace(redis_url=f"redis://127.0.0.1:{own_redis.port}/0", metrics_port=port, batch_size=100)
    proc = start_rating(s, tmp_path / "rate.log")
    try:
        produce_events(s, [ev(at=i * MIN / 10, id=f"a{i}") for i in range(300)])
        wait_until(lambda: scrape(port).get("tallyflow_records_total{outcome=accepted}") == 300, 60, "300 events accepted")
        own_redis.stop()
        produce_events(s, [ev(at=30 * MIN + i * MIN / 100, id=f"b{i}") for i in range(5000)])
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


def test_catalog_change_mid_stream_onboards_and_upgrades_without_restart(settings: Settings, tmp_path: Path) -> None:
    cat_path = tmp_path / "catalog.yaml"
    v1 = copy.deepcopy(CATALOG)
    v1["tenants"] = [t for t in v1["tenants"] if t["tenant_id"] == "acme"]
    write_catalog(cat_path, v1)
    port = free_port()
    s = settings.replace(catalog=str(cat_path), metrics_port=port, catalog_reload_seconds=0.2, idle_timeout_seconds=1)
    proc = start_rating(s, tmp_path / "rate.log")
    try:
        before = UPGRADE_AT - timedelta(hours=1)
        produce_events(s, [ev(at=before + i * MIN, id=f"p{i}") for i in range(11)] + [ev("newco", at=before, id="n0")])
        wait_until(lambda: scrape(port).get("tallyflow_records_total{outcome=in}") == 12, 60, "the first 12 events")

        # Onboard newco and move acme to plus from UPGRADE_AT; a broken edit first is refused.
        bad = copy.deepcopy(v1)
        bad["plans"][0]["meters"]["calls"]["included"] = 5  # basic:v1 changed in place
        write_catalog(cat_path, bad)
        wait_until(lambda: scrape(port).get("tallyflow_catalog_reloads_total{outcome=error}") == 1, 30, "the bad edit refused")
        v2 = copy.deepcopy(v1)
        v2["tenants"][0]["plan_changes"] = [{"plan": "plus", "effective_from": UPGRADE_AT.isoformat()}]
        v2["tenants"].append({**v2["tenants"][0], "tenant_id": "newco", "plan_changes": [], "crm_account_id": "CRM-9"})
        write_catalog(cat_path, v2)
        wait_until(lambda: scrape(port).get("tallyflow_catalog_reloads_total{outcome=ok}") == 1, 30, "the catalog reload")

        after = UPGRADE_AT + timedelta(hours=1)
        produce_events(s, [ev(at=after + i * MIN, id=f"q{i}") for i in range(80)] + [ev("newco", at=after, id="n1")])
        wait_until(
            lambda: scrape(port).get("tallyflow_open_windows") == 0 and len(rated_lines(s)) > 0 and rated_count(s) == 92, 60, "all rated"
        )
        assert 0 <= scrape(port)["tallyflow_input_delay_seconds"] < 30  # the last batch: produced moments ago
    finally:
        proc.kill()
        proc.wait(10)
    lines = rated_lines(s)
    by_version: dict[tuple[str, str], tuple[Decimal, Decimal]] = {}
    for ln in lines:
        q, a = by_version.get((ln.tenant_id, ln.pricing_version), (D(0), D(0)))
        by_version[(ln.tenant_id, ln.pricing_version)] = (q + ln.quantity, a + ln.amount)
    # From the effective instant acme is rated under plus (100 included, 0.05): 80 calls are free.
    assert by_version == {("acme", "basic:v1"): (11, D("0.10")), ("acme", "plus:v2"): (80, 0), ("newco", "basic:v1"): (1, 0)}
    alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
    acme = [(a.plan_id, a.level) for a in alerts if a.tenant_id == "acme"]
    # plus's own thresholds, on the usage under plus: its 80 % (80 of 100) at the 80th call after the upgrade.
    assert acme == [("basic", "80%"), ("basic", "100%"), ("plus", "80%")]
    dead = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.brokers, s.topics.dlq)]
    assert [(d.reason, d.event_id) for d in dead] == [("unknown_tenant", "n0")]  # before onboarding only
