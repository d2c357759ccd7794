"""The long-horizon dedup store against a real redis-server: only evicted generations are
stored, in bulk; a copy from another position is a duplicate, a re-read is not."""

from __future__ import annotations

from devkit.stack import LocalStack
from operators.dedup import Evicted, GenerationalDedup, event_hash, meta, position
from operators.engine_state import Question
from runtime.settings import Settings
from state.dedup_store import DedupStore

T0 = 1_793_000_000_000  # event time (ms) of the events here


def acc(tenant: str, key: str, partition: int, offset: int, index: int | None = None) -> Question:
    """What the engine asks about an event: tenant, dedup hash, event time, read position."""
    return (tenant, event_hash(tenant, "svc", key), T0, position(partition, offset, index))


def evict(tenant: str, events: list[Question]) -> Evicted:
    d = GenerationalDedup(1)
    for _, h, ts, pos in events:
        d.seen(h, meta(pos, ts))
    ids, log = d.drain()  # type: ignore[misc]
    return Evicted(tenant, ids, log)


def test_evicted_ids_are_known_by_position_before_and_after_they_are_written(stack: LocalStack, settings: Settings) -> None:
    store = DedupStore(settings.stores)
    originals = [acc("acme", f"e-{i}", 0, 10 + i) for i in range(1000)] + [acc("acme", "arr", 1, 50, index=70_000)]
    store.evicted([evict("acme", originals)])
    # Held, not yet written: asked about already.
    assert store.duplicates([acc("acme", "e-3", 2, 1), acc("acme", "e-4", 0, 14), acc("acme", "new", 0, 1)]) == {0}
    store.drain()
    assert store.pending == [] and store.written_ids == 1001
    # A fresh process (empty cache) asks Redis: copies are duplicates, re-reads and other tenants are not.
    fresh = DedupStore(settings.stores)
    asked = [acc("acme", "e-7", 3, 1), acc("acme", "e-8", 0, 18), acc("bolt", "e-7", 3, 1), acc("acme", "arr", 1, 50, index=70_000)]
    assert fresh.duplicates(asked) == {0}
    assert fresh.duplicates([acc("acme", "arr", 1, 50, index=70_001)]) == {0}
    keys = list(fresh.r.scan_iter(f"{settings.stores.redis_prefix}:dd:*"))
    assert keys and all(6 * 86400 < fresh.r.ttl(k) <= 7 * 86400 for k in keys)


def test_a_write_costs_about_twelve_bytes_an_id(stack: LocalStack, settings: Settings) -> None:
    store = DedupStore(settings.stores)
    before = int(store.r.info("memory")["used_memory"])
    for t in range(20):
        tenant = f"t-{t:04d}"
        store.evicted([evict(tenant, [acc(tenant, f"e-{i}", t % 4, i) for i in range(5_000)])])
    store.drain()
    per_id = (int(store.r.info("memory")["used_memory"]) - before) / 100_000
    print(f"\nredis bytes per id: {per_id:.1f}")
    assert per_id <= 24, per_id
