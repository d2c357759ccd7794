"""The long-horizon dedup store against a real redis-server."""

from __future__ import annotations

import msgspec

from devkit.stack import LocalStack
from runtime.settings import Settings
from schemas.records import Accepted
from state.dedup_store import DedupStore


def acc(tenant: str, key: str, partition: int, offset: int) -> Accepted:
    return Accepted(tenant, "basic:v1", key, key, 0, [], b"", "t", partition, offset, None)


def test_dedup_store_knows_positions_and_expires_ids(stack: LocalStack, settings: Settings) -> None:
    store = DedupStore(settings.stores)
    items = [acc("acme", "svc/1", 0, 10), acc("acme", "svc/2", 0, 11), acc("acme", "svc/1", 1, 99)]
    assert store.duplicates(items) == {2}  # a copy within the batch
    # Read again from the same positions (crash replay, backfill): not duplicates of themselves.
    assert store.duplicates(items[:2]) == set()
    assert store.duplicates([acc("bolt", "svc/1", 2, 1), acc("acme", "svc/2", 2, 2)]) == {1}  # per tenant
    # Recorded in the background, then asked about: known once drained (duplicates drains).
    store.record([acc("acme", f"bg/{i}", 0, 100 + i) for i in range(500)])
    assert store.duplicates([acc("acme", "bg/7", 3, 1), acc("acme", "bg/8", 0, 108), acc("acme", "bg/x", 0, 1)]) == {0}
    big = msgspec.structs.replace(acc("acme", "big/1", 0, 5), index=70_000)
    assert store.duplicates([big]) == set() and store.duplicates([msgspec.structs.replace(big, index=70_001)]) == {0}
    buckets = list(store.r.scan_iter(f"{settings.stores.redis_prefix}:dedup:*"))
    assert buckets and all(7 * 86400 < store.r.ttl(b) <= 8 * 86400 for b in buckets)
