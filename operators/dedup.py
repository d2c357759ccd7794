"""Windowed deduplication on (subject, source, id), bounded by an event-time horizon.

Two generations of ids per tenant: lookups check both, inserts go to the current one, and
when the tenant's watermark has advanced a full horizon the older generation is dropped.
Every id is therefore remembered for at least one horizon of event time and memory holds
at most two horizons' worth, with O(1) work per event and no per-id timestamps.
"""

from __future__ import annotations


class GenerationalDedup:
    __slots__ = ("cur", "gen_start_ms", "horizon_ms", "prev")

    def __init__(self, horizon_ms: int) -> None:
        self.cur: set[str] = set()
        self.prev: set[str] = set()
        self.gen_start_ms: int | None = None
        self.horizon_ms = horizon_ms

    def seen(self, key: str) -> bool:
        """True if `key` was seen within the horizon; otherwise remember it."""
        if key in self.cur or key in self.prev:
            return True
        self.cur.add(key)
        return False

    def advance(self, watermark_ms: int) -> None:
        """Rotate generations once the watermark has moved a horizon past the current one."""
        if self.gen_start_ms is None:
            self.gen_start_ms = watermark_ms
        elif watermark_ms - self.gen_start_ms >= self.horizon_ms:
            self.prev, self.cur = self.cur, set()
            self.gen_start_ms = watermark_ms

    def next_rotation(self) -> int:
        """The watermark at which `advance` has work to do."""
        return -(2**62) if self.gen_start_ms is None else self.gen_start_ms + self.horizon_ms

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)
