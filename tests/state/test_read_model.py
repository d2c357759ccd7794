"""The read model's store against a real redis-server: a write carrying fewer events than the
stored document (an older state re-derived by a crash replay) is refused; equal or more wins."""

from __future__ import annotations

import asyncio
import time

import redis

from devkit.stack import LocalStack
from runtime.settings import Settings
from schemas.usage import USAGE_FACTS, UsageFacts
from state.read_model import ReadModelReader, ReadModelWriter

END_MS = int(time.time() * 1000) + 86_400_000


def doc(events: int, watermark_ms: int = 1_793_354_400_000) -> UsageFacts:
    return UsageFacts("acme", "2026-11", "month", 1_793_491_200_000 - 30 * 86_400_000, END_MS, watermark_ms, watermark_ms, events, [])


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
            return await r.periods("acme")
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
    # Kept for read_model_days after the period's end.
    ttl = redis.Redis.from_url(settings.stores.redis_url).ttl(f"{settings.stores.key('usage')}:acme:2026-11")
    assert abs(ttl - (END_MS / 1000 - time.time() + settings.stores.read_model_days * 86_400)) < 60
    assert periods(settings) == ["2026-11"]
