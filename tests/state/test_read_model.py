"""The read model's store against a real redis-server: a write carrying fewer events than the
stored document (an older state re-derived by a crash replay) is refused; equal or more wins."""

from __future__ import annotations

import asyncio
import time

import redis

from devkit.stack import LocalStack
from runtime.settings import Settings
from schemas.usage import TENANT_USAGE, TenantUsage
from state.read_model import ReadModelReader, ReadModelWriter

END_MS = int(time.time() * 1000) + 86_400_000


def doc(events: int, watermark: str = "2026-11-02T10:00:00.000Z") -> TenantUsage:
    return TenantUsage(
        tenant_id="acme",
        period="2026-11",
        period_start="2026-11-01T00:00:00.000Z",
        period_end="2026-12-01T00:00:00.000Z",
        watermark=watermark,
        as_of="2026-11-02T10:00:01.000Z",
        events=events,
        meters={},
    )


def stored(s: Settings) -> TenantUsage | None:
    async def get() -> bytes | None:
        r = ReadModelReader(s.stores)  # an asyncio client belongs to one event loop
        try:
            return await r.get("acme", "2026-11")
        finally:
            await r.close()

    raw = asyncio.run(get())
    return None if raw is None else TENANT_USAGE.decode(raw)


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
    w.write([(doc(10), END_MS)])
    w.write([(doc(7, "2026-11-02T09:00:00.000Z"), END_MS)])  # a replay still catching up
    got = stored(settings)
    assert got is not None and (got.events, got.watermark) == (10, "2026-11-02T10:00:00.000Z")
    w.write([(doc(10, "2026-11-02T10:30:00.000Z"), END_MS)])  # same events, windows closed since
    w.write([(doc(12), END_MS)])
    got = stored(settings)
    assert got is not None and got.events == 12
    # Kept for read_model_days after the period's end.
    ttl = redis.Redis.from_url(settings.stores.redis_url).ttl(f"{settings.stores.key('usage')}:acme:2026-11")
    assert abs(ttl - (END_MS / 1000 - time.time() + settings.stores.read_model_days * 86_400)) < 60
    assert periods(settings) == ["2026-11"]
