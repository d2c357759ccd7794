"""Long-horizon dedup in Redis: the backstop behind the in-memory window.

Each accepted event's dedup key is hashed (tenant-scoped, 8 bytes of BLAKE2b) and stored
with a TTL of the horizon (default 7 days) and the *position* it was read from
(partition:offset:index). A key already present with another position is a duplicate; with
the same position it is this very message read again, by a crash replay or a backfill,
which must count as it did the first time. That is what keeps Redis consistent with
recovery snapshots without any coordination. One Lua call per consumed batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import redis

from sinks.patience import Patience

# SET NX GET (Redis >= 7.0) sets and returns the previous value in one command.
_CHECK = """
local ttl = ARGV[1]
local dups = {}
for i = 1, #KEYS do
  local old = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'GET', 'PX', ttl)
  if old and old ~= ARGV[i + 1] then dups[#dups + 1] = i - 1 end
end
return dups
"""


class DedupStore:
    def __init__(
        self, url: str, horizon_seconds: float, prefix: str = "tallyflow:dedup", on_change: Callable[[bool], None] | None = None
    ) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.ttl_ms = int(horizon_seconds * 1000)
        self.prefix = prefix
        self._check = self.r.register_script(_CHECK)
        self.patience = Patience("long-horizon dedup", on_change=on_change)

    def key(self, tenant: str, dedup_key: str) -> str:
        return f"{self.prefix}:{tenant}:{hashlib.blake2b(dedup_key.encode(), digest_size=8).hexdigest()}"

    def duplicates(self, items: Sequence[tuple[str, str, str]]) -> set[int]:
        """Indices of items (tenant, dedup key, position) already seen at another position.
        Records the rest. Waits, without pulling input, while Redis is unreachable."""
        if not items:
            return set()
        keys = [self.key(t, k) for t, k, _ in items]
        args: list[str | int] = [self.ttl_ms, *(p for _, _, p in items)]
        res = self.patience(lambda: self._check(keys=keys, args=args))
        return set(res)
