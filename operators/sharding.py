"""Tenant -> shard: stable across processes and restarts (crc32, not Python's salted
hash), so a tenant's state always lives in the same engine, whatever the Kafka key was."""

from __future__ import annotations

import zlib

from schemas.records import Accepted


class Sharder:
    __slots__ = ("_cache", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._cache: dict[str, str] = {}

    def __call__(self, tenant_id: str) -> str:
        k = self._cache.get(tenant_id)
        if k is None:
            k = self._cache[tenant_id] = f"s{zlib.crc32(tenant_id.encode()) % self.n:04d}"
        return k

    def group(self, accepted: list[Accepted]) -> dict[str, list[Accepted]]:
        """Split a batch by shard, keeping each tenant's events in order."""
        cache = self._cache
        groups: dict[str, list[Accepted]] = {}
        for a in accepted:
            k = cache.get(a.tenant_id) or self(a.tenant_id)
            g = groups.get(k)
            if g is None:
                groups[k] = [a]
            else:
                g.append(a)
        return groups
