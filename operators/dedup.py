"""Windowed deduplication on (subject, source, id), bounded by an event-time horizon, with
what leaves memory handed to a long-horizon store.

Two generations of ids per tenant: lookups check both, inserts go to the current one, and
when the tenant's watermark has advanced a full horizon the older generation is evicted.
Every id is therefore remembered in memory for at least one horizon of event time and
memory holds at most two, with O(1) work per event. Ids are 64-bit hashes (xxh3 of tenant,
source and id: stable across processes, so they survive snapshots and can be stored), and
each generation keeps a log of (hash, where it was read and the hour of its event time),
so an evicted generation goes to the store in bulk, without a per-event store write.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from xxhash import xxh3_64_intdigest

HOUR_MS = 3_600_000
_MASK32 = 0xFFFFFFFF


def event_hash(tenant: str, source: str, event_id: str) -> int:
    """The dedup key of an event: (subject, source, id) as a stable 64-bit hash."""
    return xxh3_64_intdigest(f"{tenant}\x1f{source}\x1f{event_id}".encode())


def position(partition: int, offset: int, index: int | None) -> int:
    """Where an event was read, folded to 32 bits: a copy read at another position is a
    duplicate; the same message read again (a crash replay, a backfill) is not. Two
    positions fold together only when their offsets differ by a multiple of 2^32."""
    return (offset * 1_000_003 + partition * 65_537 + (0xFFFF if index is None else index)) & _MASK32


def meta(pos32: int, ts_ms: int) -> int:
    """What the log keeps beside a hash: the position and the hour of the event time."""
    return (pos32 << 32) | (ts_ms // HOUR_MS)


@dataclass(slots=True)
class Evicted:
    """A generation that left memory, for the long-horizon store: its ids (a set, so the
    store can answer for them until they are written) and their log."""

    tenant: str
    ids: set[int]
    log: array  # type: ignore[type-arg]  # pairs: hash, meta


class GenerationalDedup:
    __slots__ = ("cur", "cur_log", "gen_start_ms", "horizon_ms", "prev", "prev_log")

    def __init__(self, horizon_ms: int) -> None:
        self.cur: set[int] = set()
        self.prev: set[int] = set()
        self.cur_log: array = array("Q")  # type: ignore[type-arg]
        self.prev_log: array = array("Q")  # type: ignore[type-arg]
        self.gen_start_ms: int | None = None
        self.horizon_ms = horizon_ms

    def seen(self, h: int, m: int = 0) -> bool:
        """True if `h` was seen within the horizon; otherwise remember it (with `m`, its meta).
        The engine inlines this on its hot path."""
        if h in self.cur or h in self.prev:
            return True
        self.cur.add(h)
        self.cur_log.append(h)
        self.cur_log.append(m)
        return False

    def advance(self, watermark_ms: int) -> tuple[set[int], array] | None:  # type: ignore[type-arg]
        """Rotate generations once the watermark has moved a horizon past the current one;
        returns the evicted generation's ids and log, if any."""
        if self.gen_start_ms is None:
            self.gen_start_ms = watermark_ms
        elif watermark_ms - self.gen_start_ms >= self.horizon_ms:
            gone = (self.prev, self.prev_log) if self.prev else None
            self.prev, self.prev_log = self.cur, self.cur_log
            self.cur, self.cur_log = set(), array("Q")
            self.gen_start_ms = watermark_ms
            return gone
        return None

    def drain(self) -> tuple[set[int], array] | None:  # type: ignore[type-arg]
        """Everything in memory, for the store (a bounded run ends: nothing may be lost)."""
        if not (self.cur or self.prev):
            return None
        ids = self.cur | self.prev
        log = self.prev_log + self.cur_log
        return ids, log

    def next_rotation(self) -> int:
        """The watermark at which `advance` has work to do."""
        return -(2**62) if self.gen_start_ms is None else self.gen_start_ms + self.horizon_ms

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)
