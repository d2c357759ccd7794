"""Deterministic ids, so a replay produces the same alert_id / line_id as the first run."""

from __future__ import annotations

import hashlib
import uuid

_NS = uuid.UUID("6f1c2d36-7a52-4a8e-9c1e-54a1f0e0b7d1").bytes


def stable_id(*parts: object) -> str:
    """Deterministic id (a UUIDv5), so a replay produces the same alert_id / line_id.
    Computed with hashlib directly: uuid.uuid5 costs several times more per line."""
    b = bytearray(hashlib.sha1(_NS + "|".join(map(str, parts)).encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    x = b.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
