"""The read model's store against a real redis-server: a write built from fewer input records
than the stored document (an older state re-derived by a crash replay) is refused; as many
or more wins, whatever its figures; every document taken is announced with its version."""

from __future__ import annotations

import asyncio
import time

import msgspec
import redis

from devkit.stack import LocalStack
from runtime.settings import Settings
from schemas.usage import USAGE_FACTS, UsageFacts
from state.read_model import ReadModelChanges, ReadModelReader, ReadModelWriter

END_MS = int(time.time() * 1000) + 86_400_000


def doc(events: int, watermark_ms: int = 1_793_354_400_000, records: int | None = None) -> UsageFacts:
    start = 1_793_491_200_000 - 30 * 86_400_000
    return UsageFacts(
        "acme", "2026-11", "month", start, END_MS, watermark_ms, watermark_ms, events, [], events if records is None else records
    )


def stored(s: Settings) -> UsageFacts | None:
    async def get() -> bytes | None:
        r = ReadModelReader(s.stores)  # an asyncio client belongs to one event loop
        try:
            return await r.get("acme", "2026-11")
        finally:
            await r.close()

    raw = asyncio.run(get())
    return None if raw is None else USAGE_FACTS.decode(raw)


def periods(s: Settings) -> list[str]:
    async def get() -> list[str]:
        r = ReadModelReader(s.stores)
        try:
            return await r.existing("acme", ["2026-12", "2026-11", "2026-10"])
        finally:
            await r.close()

    return asyncio.run(get())


def test_an_older_state_never_overwrites_a_newer_one(stack: LocalStack, settings: Settings) -> None:
    w = ReadModelWriter(settings.stores)
    assert stored(settings) is None
    w.write([doc(10)])
    w.write([doc(7, 1_793_350_800_000)])  # a replay still catching up, an hour behind
    got = stored(settings)
    assert got is not None and (got.events, got.watermark_ms) == (10, 1_793_354_400_000)
    w.submit([doc(10, 1_793_356_200_000)])  # same events, windows closed since (through the writer thread)
    w.submit([doc(12)])
    w.flush()
    got = stored(settings)
    assert got is not None and got.events == 12
    # Issue 18: the process that died had accepted an event its replay judges otherwise (a
    # wrong state at a higher event count). Once the replay has read as much input, its state
    # is the one kept, though it has fewer events.
    w.write([doc(11, records=12)])
    got = stored(settings)
    assert got is not None and (got.events, got.records) == (11, 12)
    w.write([doc(13, records=11)])  # further back along the input: refused whatever its figures
    got = stored(settings)
    assert got is not None and got.events == 11
    # Kept for read_model_days after the period's end.
    ttl = redis.Redis.from_url(settings.stores.redis_url).ttl(f"{settings.stores.key('usage')}:acme:2026-11")
    assert abs(ttl - (END_MS / 1000 - time.time() + settings.stores.read_model_days * 86_400)) < 60
    assert periods(settings) == ["2026-11"]


def test_a_document_from_before_the_records_guard_is_taken_over(stack: LocalStack, settings: Settings) -> None:
    k = f"{settings.stores.key('usage')}:acme:2026-11"
    redis.Redis.from_url(settings.stores.redis_url).hset(k, mapping={"n": 500, "doc": b"[]"})
    ReadModelWriter(settings.stores).write([doc(3)])
    got = stored(settings)
    assert got is not None and got.events == 3


def test_a_write_announces_the_documents_it_took_with_versions_that_only_grow(stack: LocalStack, settings: Settings) -> None:
    """Every script call that takes documents publishes their keys and versions (records, then
    writes), in the same script: what a reader caches is dropped by the next announcement.
    A refused write announces nothing."""
    announced: list[tuple[str, tuple[int, int]]] = []
    live: list[bool] = []

    async def listen() -> None:
        changes = ReadModelChanges(settings.stores, announced.extend, live.append)
        task = asyncio.create_task(changes.run())
        try:
            while not live:
                await asyncio.sleep(0.01)  # polling the subscription's start
            w = ReadModelWriter(settings.stores)
            await asyncio.to_thread(w.write, [doc(10)])
            await asyncio.to_thread(w.write, [doc(7)])  # refused: further back along the input
            await asyncio.to_thread(w.write, [doc(10, 1_793_356_200_000)])  # as far: taken, a new version
            await asyncio.to_thread(w.write, [doc(12)])
            # A last write of another key: announcements arrive in order on the one
            # subscription, so once it is heard every earlier one (and no refused one) is.
            await asyncio.to_thread(w.write, [msgspec.structs.replace(doc(1), tenant_id="marker")])
            while not any(":marker:" in a[0] for a in announced):
                await asyncio.sleep(0.01)  # polling the announcements' arrival
            r = ReadModelReader(settings.stores)
            try:
                k = f"{settings.stores.key('usage')}:acme:2026-11"
                assert (await r.read(k))[1] == (12, 3)
                assert await r.versions([k, k + "-none"]) == [(12, 3), (0, 0)]
            finally:
                await r.close()
        finally:
            task.cancel()

    asyncio.run(listen())
    k = f"{settings.stores.key('usage')}:acme:2026-11"
    assert announced[:-1] == [(k, (10, 1)), (k, (10, 2)), (k, (12, 3))] and ":marker:" in announced[-1][0]
    assert live == [True, False]  # False: cancelled
