"""Long-horizon dedup in Redis: the backstop behind the in-memory window.

Only what leaves memory is stored, in bulk: when a tenant's oldest generation of ids is
evicted (its watermark moved two horizons on), the generation's log — per id an 8-byte hash
of (tenant, source, id) and a 4-byte fold of where it was read — goes to Redis as packed
blobs, grouped by tenant stripe and event-time hour: one Redis hash per (stripe, hour), one
field per write, kept for the store horizon (wall clock) after its last write, so a
backfill of old event times is protected as well as live traffic. That is 12 bytes per id
plus a field's overhead shared by all ids of one write; no per-event Redis work at all.

An event is asked about only when memory cannot judge it: its event time is more than a
horizon behind its tenant's watermark, or its tenant is new to this process. The answer
comes from generations evicted but not yet written (held here), else from the (stripe,
hour) blobs, fetched once and cached: this process is the only writer of its tenants'
entries, so its cache stays true as it writes. An id found with *another* position is a
duplicate; with the same position it is this very message read again (a crash replay, a
backfill), which counts as it did the first time.

Evicted generations are written when enough have gathered, and always before a recovery
snapshot (`drain`): a snapshot never lacks an id that neither it nor Redis holds.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

from operators.dedup import HOUR_MS, Evicted
from operators.engine_state import Question
from runtime.redis import Patience, client
from runtime.settings import StoreSettings

log = logging.getLogger(__name__)
DAY_S = 86_400
STRIPES = 1024  # per tenant: its stripe, and 4 sub-stripes by the top bits of the id hash
WRITE_AT_IDS = 200_000  # evicted ids gathered before a write (a snapshot writes sooner)
CACHE_IDS = 2_000_000  # ids of fetched (stripe, hour) keys kept in this process


def _stripe(tenant: str, h: int) -> int:
    return (zlib.crc32(tenant.encode()) + (h >> 62)) % STRIPES


class DedupStore:
    def __init__(self, store: StoreSettings, on_change: Callable[[bool], None] | None = None) -> None:
        self.r = client(store.redis_url)
        self.horizon_s = int(store.dedup_store_days * DAY_S)
        self.prefix = store.key("dd")
        self.patience = Patience("long-horizon dedup", on_change=on_change)
        self.pending: list[Evicted] = []  # evicted, not yet written
        self.pending_by_tenant: dict[str, list[Evicted]] = {}  # the same, for asking (100,000 tenants: no scan)
        self.pending_ids = 0
        self.cache: OrderedDict[str, dict[int, int]] = OrderedDict()  # key -> {hash: position}
        self.cached_ids = 0
        self.writer = f"{os.getpid():x}.{time.time_ns():x}"
        self.writes = 0
        self.written_ids = 0

    def key(self, stripe: int, hour: int) -> str:
        return f"{self.prefix}:{stripe}:{hour}"

    # -- what leaves memory -----------------------------------------------------------------
    def evicted(self, gone: list[Evicted]) -> None:
        self.pending += gone
        for g in gone:
            self.pending_by_tenant.setdefault(g.tenant, []).append(g)
        self.pending_ids += sum(len(g.ids) for g in gone)
        if self.pending_ids >= WRITE_AT_IDS:
            self.drain()

    def drain(self) -> None:
        """Write every evicted generation held here (before a snapshot, at end of input)."""
        if not self.pending:
            return
        groups = self._group(self.pending)
        field = f"{self.writer}.{self.writes}"
        self.writes += 1

        def write() -> None:
            p = self.r.pipeline(transaction=False)
            for key, (hs, ps) in groups.items():
                p.hset(key, field, hs.tobytes() + ps.tobytes())
                p.expire(key, self.horizon_s)
            p.execute()

        self.patience(write)
        for key, (hs, ps) in groups.items():
            cached = self.cache.get(key)
            if cached is not None:
                cached.update(zip(hs, ps, strict=True))
                self.cached_ids += len(hs)
        self.written_ids += self.pending_ids
        self.pending, self.pending_ids = [], 0
        self.pending_by_tenant = {}

    def _group(self, gone: list[Evicted]) -> dict[str, tuple[array, array]]:  # type: ignore[type-arg]
        """Logs -> per (stripe, hour) key: the hashes and the positions, as packed arrays."""
        groups: dict[str, tuple[array, array]] = {}  # type: ignore[type-arg]
        for g in gone:
            tcrc = zlib.crc32(g.tenant.encode())
            it = iter(g.log)
            for h, m in zip(it, it, strict=True):
                hour = m & 0xFFFFFFFF
                k = self.key((tcrc + (h >> 62)) % STRIPES, hour)
                grp = groups.get(k)
                if grp is None:
                    grp = groups[k] = (array("Q"), array("I"))
                grp[0].append(h)
                grp[1].append(m >> 32)
        return groups

    # -- asking ----------------------------------------------------------------------------
    def duplicates(self, questions: Sequence[Question]) -> set[int]:
        """Indices of the questions (tenant, hash, event time ms, position) whose id is held
        from another position; waits, without pulling input, while Redis is unreachable."""
        if not questions:
            return set()
        keys = {self.key(_stripe(tenant, h), ts // HOUR_MS) for tenant, h, ts, _ in questions}
        self._fetch([k for k in keys if k not in self.cache])
        dups: set[int] = set()
        for i, (tenant, h, ts, pos) in enumerate(questions):
            held = self._unwritten(tenant, h)
            if held is None:
                entries = self.cache.get(self.key(_stripe(tenant, h), ts // HOUR_MS))
                held = entries.get(h) if entries is not None else None
            if held is not None and held != pos:
                dups.add(i)
        return dups

    def _unwritten(self, tenant: str, h: int) -> int | None:
        """The position of `h` in a generation evicted but not written yet, if it is in one."""
        for g in self.pending_by_tenant.get(tenant, ()):
            if h in g.ids:
                it = iter(g.log)
                return int(next(m >> 32 for x, m in zip(it, it, strict=True) if x == h))
        return None

    def _fetch(self, keys: list[str]) -> None:
        if not keys:
            return

        def read() -> list[list[bytes]]:
            p = self.r.pipeline(transaction=False)
            for k in keys:
                p.hvals(k)
            return p.execute()  # type: ignore[no-any-return]

        for k, blobs in zip(keys, self.patience(read), strict=True):
            entries: dict[int, int] = {}
            for blob in blobs:
                n = len(blob) // 12
                hs, ps = array("Q"), array("I")
                hs.frombytes(blob[: 8 * n])
                ps.frombytes(blob[8 * n :])
                entries.update(zip(hs, ps, strict=True))
            self.cache[k] = entries
            self.cached_ids += len(entries)
        while self.cached_ids > CACHE_IDS and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cached_ids -= len(old)
