"""Reading the read model straight from Redis, as the API does."""

from __future__ import annotations

import redis

from runtime.settings import Settings
from schemas.usage import TENANT_USAGE, TenantUsage


def read_model(s: Settings) -> dict[tuple[str, str], TenantUsage]:
    """Every document under the settings' prefix, by (tenant, period)."""
    r = redis.Redis.from_url(s.stores.redis_url)
    out: dict[tuple[str, str], TenantUsage] = {}
    for k in r.scan_iter(match=s.stores.key("usage") + ":*", count=1000):
        doc = TENANT_USAGE.decode(r.hget(k, "doc"))  # type: ignore[arg-type]
        out[(doc.tenant_id, doc.period)] = doc
    return out


def counts(s: Settings) -> dict[bytes, int]:
    """Each document's accepted-event count, by key."""
    r = redis.Redis.from_url(s.stores.redis_url)
    return {k: int(r.hget(k, "n") or 0) for k in r.scan_iter(match=s.stores.key("usage") + ":*", count=1000)}  # type: ignore[arg-type]
