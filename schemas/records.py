"""The record that passes between the rating dataflow's steps: an event that passed
validation, on its way to the engine that owns its tenant."""

from __future__ import annotations

from typing import Any

import msgspec


class Accepted(msgspec.Struct, gc=False):
    """A schema-valid, enriched event on its way to its tenant's shard. It holds ids, not
    catalog objects, because batches cross workers."""

    tenant_id: str
    pricing_version: str
    h: int  # dedup key: a stable 64-bit hash of (tenant, source, id)
    m: int  # what the dedup log keeps beside it: the read position and the event-time hour
    event_id: str
    ts_ms: int
    values: list[tuple[str, Any, tuple[str, ...] | None]]  # (meter slug, quantity or unique value, matrix cell)
    payload: bytes
    topic: str
    partition: int
    offset: int
    index: int | None
    seen: bool = False  # the long-horizon dedup store has this key from another position
