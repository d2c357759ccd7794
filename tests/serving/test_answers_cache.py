"""Answers kept per document version (issue 24): a check whose document has not changed asks
Redis nothing; a write changes the next answer once its announcement is in; a process never
answers an older version than it has answered; several worker processes behind one port
each stay current. Against a real redis-server (the test's own, so its command counts are
the API's alone), a real rating process where an event must travel, and real HTTP."""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from devkit.pipeline import wait_until
from devkit.stack import free_port
from operators.periods import period_of
from operators.stats import Stats
from runtime.settings import Settings, to_env
from schemas.usage import MeterFacts, UsageFacts, VersionFacts
from serving.ingest import catalog_watch
from serving.usage import CONFIRM_S, Queries
from state.read_model import ReadModelChanges, ReadModelReader, ReadModelWriter, Version
from tests.serving.conftest import READER
from tests.support.events import CATALOG, UPGRADE_AT, ev
from tests.support.flows import OwnRedis, produce_events, start_rating, write_catalog

NOW_MS = int(time.time() * 1000)
CURRENT = period_of(NOW_MS, "month")
READ = {"Authorization": f"Bearer {READER}"}
CHECK = "/v1/tenants/acme/entitlements/calls"


def on(r: OwnRedis) -> dict[str, Any]:
    return {"redis_url": f"redis://127.0.0.1:{r.port}"}


def calls_used(n: int, records: int | None = None) -> UsageFacts:
    """acme's document of this month as the rating dataflow writes it: `n` calls (basic:v1)."""
    at = max(CURRENT.start_ms, NOW_MS - 60_000)
    meter = MeterFacts("calls", at, [VersionFacts("basic:v1", Decimal(n), Decimal(0), n)], [], [])
    return UsageFacts(
        "acme", CURRENT.key, "month", CURRENT.start_ms, CURRENT.end_ms, at, NOW_MS, n, [meter], n if records is None else records
    )


def used(c: httpx.Client) -> str:
    r = c.get(CHECK, headers=READ)
    assert r.status_code == 200, r.text
    return str(r.json()["used"])


def redis_reads(r: redis.Redis) -> int:
    """Reads of documents the API has made (HGET before issue 24, HMGET since)."""
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("hget", "hmget"))


def _script_calls(r: redis.Redis) -> int:
    """Scripts run (after the test's last write: the API's confirmation rounds)."""
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


# -- one process, its queries driven directly: the order of announcements and reads is the test's --


def _scenario(s: Settings, body: Callable[[Queries, ReadModelWriter, asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """`body(queries, writer, heard)` with the queries subscribed to the announcements of the
    real Redis of `s`; `heard` is set by every announcement the queries were handed."""

    async def run() -> None:
        reader = ReadModelReader(s.stores)
        q = Queries(catalog_watch(s, Stats()), reader)
        heard = asyncio.Event()

        def changed(changes: list[tuple[str, Version]]) -> None:
            q.changed(changes)
            heard.set()

        task = asyncio.create_task(ReadModelChanges(s.stores, changed, q.set_live).run())
        try:
            for _ in range(500):
                if q.live:
                    break
                await asyncio.sleep(0.01)  # polling the subscription's start, not a synchronisation of the test
            assert q.live, "the subscription to announcements did not start"
            await body(q, ReadModelWriter(s.stores), heard)
        finally:
            task.cancel()
            await reader.close()

    asyncio.run(run())


async def _write(w: ReadModelWriter, heard: asyncio.Event, doc: UsageFacts) -> None:
    """Write as the rating dataflow does, and wait for the announcement to reach the queries."""
    heard.clear()
    await asyncio.to_thread(w.write, [doc])
    await asyncio.wait_for(heard.wait(), 5)


def _used(answer: bytes) -> str:
    return str(orjson.loads(answer)["used"])


def test_a_current_answer_asks_redis_nothing_and_an_announced_write_changes_the_next_one(small: Settings, own_redis: OwnRedis) -> None:
    async def body(q: Queries, w: ReadModelWriter, heard: asyncio.Event) -> None:
        await _write(w, heard, calls_used(3))
        assert _used(await q.entitlement_json("acme", "calls", None)) == "3"
        reads = q.reads
        for _ in range(200):  # current: answered from memory, the same bytes
            assert _used(await q.entitlement_json("acme", "calls", None)) == "3"
        assert q.reads == reads
        await _write(w, heard, calls_used(4))  # a new event reached the read model
        assert _used(await q.entitlement_json("acme", "calls", None)) == "4"  # the very next answer
        assert q.reads == reads + 1  # one round trip for the new version

    _scenario(small.replace(**on(own_redis)), body)


def test_an_announcement_during_a_read_leaves_what_was_read_not_current(small: Settings, own_redis: OwnRedis) -> None:
    """Redis answered a read before a write whose announcement arrives before that answer is
    taken: the answer (true when it was read) is given, but not kept as current."""

    async def body(q: Queries, w: ReadModelWriter, heard: asyncio.Event) -> None:
        await _write(w, heard, calls_used(3))
        assert q.reader is not None
        read, was_read, held = q.reader.read, asyncio.Event(), asyncio.Event()

        async def read_then_wait(k: str) -> tuple[bytes | None, Version]:
            got = await read(k)
            was_read.set()
            await held.wait()
            return got

        q.reader.read = read_then_wait  # type: ignore[method-assign]
        answering = asyncio.create_task(q.entitlement_json("acme", "calls", None))
        await asyncio.wait_for(was_read.wait(), 10)  # the read is answered by Redis (3 calls) and held here
        await _write(w, heard, calls_used(4))
        held.set()
        assert _used(await answering) == "3"
        q.reader.read = read  # type: ignore[method-assign]
        assert _used(await q.entitlement_json("acme", "calls", None)) == "4"

    _scenario(small.replace(**on(own_redis)), body)


# -- over HTTP --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_repeated_checks_ask_redis_nothing_and_a_new_event_shows_at_once(
    api: Callable[..., httpx.Client], small: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    s = small.replace(**on(own_redis))
    c = api(**on(own_redis))
    r = redis.Redis(port=own_redis.port)
    k = f"{s.stores.key('usage')}:acme:{CURRENT.key}"
    rating = start_rating(s, tmp_path / "rating.log", TALLYFLOW_IDLE_TIMEOUT_SECONDS="600")
    try:
        at = max(NOW_MS - 30_000, CURRENT.start_ms)
        produce_events(s, [ev("acme", at=_dt(at), id="c-1")])
        wait_until(lambda: used(c) == "1", 60, "the first call in the answer")
        # The products' loop: the same check, again and again. Nothing asks Redis unless the
        # document changed meanwhile (a rewrite by the rating dataflow is announced).
        versions, reads = int(r.hget(k, "v") or 0), redis_reads(r)  # type: ignore[arg-type]
        assert all(used(c) == "1" for _ in range(300))
        assert redis_reads(r) - reads <= int(r.hget(k, "v") or 0) - versions  # type: ignore[arg-type]
        # A new event: the answer changes as soon as the read model has it (the announcement),
        # not after the periodic confirmation (2 s) or the bound on staleness (5 s).
        produce_events(s, [ev("acme", at=_dt(at + 1), id="c-2")])
        wait_until(lambda: int(r.hget(k, "v") or 0) > versions, 60, "the rating dataflow to write the second call")  # type: ignore[arg-type]
        written = time.monotonic()
        wait_until(lambda: used(c) == "2", 5, "the second call in the answer")
        assert time.monotonic() - written < 1.0
    finally:
        rating.terminate()
        rating.wait(30)


def test_a_process_never_answers_an_older_version_than_it_has_answered(
    api: Callable[..., httpx.Client], small: Settings, own_redis: OwnRedis
) -> None:
    s = small.replace(**on(own_redis))
    c = api(**on(own_redis))
    ReadModelWriter(s.stores).write([calls_used(5)])
    wait_until(lambda: used(c) == "5", 10, "5 calls in the answer")
    # Redis goes back: it lost its data (restarted without persistence), and an older state of
    # the document is what it has now (a replica from behind, a replay still catching up).
    own_redis.stop()
    own_redis.start()
    ReadModelWriter(s.stores).write([calls_used(3)])
    wait_until(lambda: c.get(CHECK, headers=READ).status_code == 200, 15, "the API to answer again")
    r = redis.Redis.from_url(s.stores.redis_url)
    scripts = _script_calls(r)
    # Past a confirmation round (the versions script): Redis was asked again in the meantime.
    wait_until(lambda: used(c) and _script_calls(r) > scripts, 10, "a confirmation round")
    assert {used(c) for _ in range(20)} == {"5"}
    # Newer than what it answered: taken.
    ReadModelWriter(s.stores).write([calls_used(7)])
    wait_until(lambda: used(c) == "7", 5, "7 calls in the answer")


def test_a_catalog_reload_changes_the_answer_without_a_new_event(
    api: Callable[..., httpx.Client], small: Settings, own_redis: OwnRedis
) -> None:
    """Answers (and the plan in force they were resolved with) are dropped with the catalog
    they were made with: acme moved to plus an hour ago is answered under plus at once."""
    s = small.replace(**on(own_redis))
    c = api(**on(own_redis), catalog_reload_seconds=0.2)
    ReadModelWriter(s.stores).write([calls_used(12)])
    wait_until(lambda: used(c) == "12", 10, "12 calls in the answer")
    before = c.get(CHECK, headers=READ).json()
    assert (before["pricing_version"], before["included"]) == ("basic:v1", "10")
    cat: dict[str, Any] = copy.deepcopy(CATALOG)
    cat["tenants"][0]["plan_changes"] = [{"plan": "plus", "effective_from": _dt(NOW_MS - 3_600_000).isoformat()}]
    write_catalog(Path(s.process.catalog), cat)
    after = wait_until(lambda: (a := c.get(CHECK, headers=READ).json())["pricing_version"] == "plus:v2" and a, 15, "the reload")
    assert (after["included"], after["used"]) == ("100", "0")  # nothing used under plus yet (SPEC §2.2)


_WORKERS = """
import sys
from runtime.settings import load_settings
from serving.server import serve
sys.exit(serve(load_settings(), "127.0.0.1", int(sys.argv[1]), workers=2))
"""


@pytest.mark.integration
def test_two_workers_behind_one_port_each_answer_the_new_version_and_count_together(
    small: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"clients:\n  - {{name: dash, token: {READER}, scopes: [read]}}\n")
    s = small.replace(**on(own_redis), api_tokens_file=str(tokens))
    port = free_port()
    log = (tmp_path / "api.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-c", _WORKERS, str(port)], env={**os.environ, **to_env(s)}, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    asked: list[str] = []

    def fresh_connection_used() -> str:
        with httpx.Client(base_url=url, timeout=10) as one:  # a new connection: either worker may take it
            asked.append(used(one))
            return asked[-1]

    try:
        w = ReadModelWriter(s.stores)
        w.write([calls_used(5)])
        wait_until(lambda: _up(url) and all(fresh_connection_used() == "5" for _ in range(20)), 30, "both workers to answer 5 calls")
        for n in (6, 7, 8):  # each worker keeps its answers, and each hears every write
            w.write([calls_used(n)])
            # Sooner than either worker's confirmation round (CONFIRM_S): by the announcement.
            wait_until(lambda n=n: all(fresh_connection_used() == str(n) for _ in range(30)), CONFIRM_S * 0.75, f"{n} from both")

        def counted() -> float:
            """One count for the pair, whichever worker serves the scrape (each publishes
            its count within a second)."""
            scrape = httpx.get(url + "/metrics", timeout=10).text
            (line,) = [ln for ln in scrape.splitlines() if ln.startswith('tallyflow_api_queries_total{kind="entitlement"}')]
            return float(line.split()[-1])

        wait_until(lambda: counted() == len(asked), 5, f"{len(asked)} checks counted")
        assert len({ln for ln in (tmp_path / "api.log").read_text().splitlines() if "Started server process" in ln}) == 2
    finally:
        api.terminate()
        assert api.wait(30) == 0
        log.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def test_the_period_and_plan_asked_follow_the_clock_across_a_plan_change_and_a_month_end(small: Settings) -> None:
    """What a check resolves (period, plan in force) is kept per tenant and period asked, but
    only while the clock is where it was found: bolt moves from basic to plus on 20 March."""
    q = Queries(catalog_watch(small, Stats()), None)
    upgrade = int(UPGRADE_AT.timestamp() * 1000)
    p, plan = q.period("bolt", None, upgrade - 1)
    assert (p.key, plan.pricing_version) == ("2026-03", "basic:v1")
    p, plan = q.period("bolt", None, upgrade)
    assert (p.key, plan.pricing_version) == ("2026-03", "plus:v2")
    march_end = period_of(upgrade, "month").end_ms
    assert q.period("acme", None, march_end - 1)[0].key == "2026-03"
    assert q.period("acme", None, march_end)[0].key == "2026-04"
    # A past period asked by name: its plan is the one at its end, whatever the clock says after.
    assert q.period("bolt", "2026-02", upgrade + 86_400_000)[1].pricing_version == "basic:v1"
    assert q.period("bolt", "2026-03", upgrade - 1)[1].pricing_version == "basic:v1"
    assert q.period("bolt", "2026-03", march_end + 1)[1].pricing_version == "plus:v2"
