"""Long-horizon dedup in Redis: the backstop behind the in-memory window.

Each accepted event is stored as a 16-byte hash of (tenant, dedup key) with the 14-byte
*position* it was read from (partition, offset, index), in one Redis hash per day of
recording and stripe, which expires a horizon (default 7 days) after its day ends. An id
present with another position is a duplicate; with the same position it is this very
message read again, by a crash replay or a backfill, which must count as it did the first
time. That keeps Redis consistent with recovery snapshots without coordination.

The hot path stays in memory: an event needs asking only when memory cannot know it (its
event time is a horizon behind its tenant's watermark, or its tenant is new to the
process): one Lua call per batch that has such events (`duplicates`). Every other accepted
event is recorded in the background (`record`) by a thread that packs whole batches into a
few binary arguments, one Lua call per batch, behind a bounded queue: if Redis goes away the
queue fills, the worker blocks, and input stops until Redis answers again. `drain` waits for
the queue, so a recovery snapshot never holds an id Redis does not, and a check never
misses an id still queued.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import queue
import struct
import threading
import time
from collections.abc import Callable, Sequence

from runtime.redis import Patience, client
from runtime.settings import StoreSettings
from schemas.records import Accepted

log = logging.getLogger(__name__)
DAY_S = 86_400
STRIPES = 64
QUEUE_BATCHES = 64
_POS = struct.Struct(">HQI")  # partition, offset, index in an array (0xFFFFFFFF: a single event)

# ARGV: ttl seconds, then (key, blob of entries) pairs.
_RECORD = """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local key, blob = ARGV[i], ARGV[i + 1]
  for j = 1, #blob, 30 do
    redis.call('HSETNX', key, string.sub(blob, j, j + 15), string.sub(blob, j + 16, j + 29))
  end
  redis.call('EXPIRE', key, ttl)
end
return 0
"""
# KEYS: the day buckets of each entry's stripe, newest first, `n` per entry; ARGV: ttl, n, blob.
_CHECK = """
local ttl, n, blob = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local dups = {}
for e = 0, #blob / 30 - 1 do
  local id, pos = string.sub(blob, e * 30 + 1, e * 30 + 16), string.sub(blob, e * 30 + 17, e * 30 + 30)
  local found = false
  for b = 1, n do
    local old = redis.call('HGET', KEYS[e * n + b], id)
    if old then
      found = true
      if old ~= pos then dups[#dups + 1] = e end
      break
    end
  end
  if not found then
    redis.call('HSET', KEYS[e * n + 1], id, pos)
    redis.call('EXPIRE', KEYS[e * n + 1], ttl)
  end
end
return dups
"""


class DedupStore:
    def __init__(self, store: StoreSettings, on_change: Callable[[bool], None] | None = None) -> None:
        self.r = client(store.redis_url)
        horizon_seconds = self.horizon_s = store.dedup_store_days * DAY_S
        self.days = math.ceil(horizon_seconds / DAY_S) + 1  # buckets that can hold a live id
        self.ttl_s = int(horizon_seconds) + DAY_S  # a bucket outlives its last write by the horizon
        self.prefix = store.key("dedup")
        self._check = self.r.register_script(_CHECK)
        self._record = self.r.register_script(_RECORD)
        self.patience = Patience("long-horizon dedup", on_change=on_change)
        self._queue: queue.Queue[Sequence[Accepted]] = queue.Queue(QUEUE_BATCHES)
        self._writer: threading.Thread | None = None
        self._failed: BaseException | None = None

    @staticmethod
    def entry(e: Accepted) -> bytes:
        h = hashlib.blake2b(f"{e.tenant_id}\x1f{e.key}".encode(), digest_size=16).digest()
        return h + _POS.pack(e.partition, e.offset, 0xFFFFFFFF if e.index is None else e.index)

    def bucket(self, day: int, stripe: int) -> str:
        return f"{self.prefix}:{day}:{stripe}"

    def duplicates(self, events: Sequence[Accepted]) -> set[int]:
        """Indices of events already seen at another position; records the rest. Waits,
        without pulling input, while Redis is unreachable."""
        if not events:
            return set()
        self.drain()
        today = int(time.time()) // DAY_S
        entries = [self.entry(e) for e in events]
        keys = [self.bucket(today - d, en[0] % STRIPES) for en in entries for d in range(self.days)]
        args: list[str | int | bytes] = [self.ttl_s, self.days, b"".join(entries)]
        return set(self.patience(lambda: self._check(keys=keys, args=args)))

    def record(self, events: Sequence[Accepted]) -> None:
        """Remember accepted events in the background; blocks only when the queue is full."""
        if self._failed is not None:
            raise RuntimeError("the dedup store writer failed") from self._failed
        if not events:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="dedup-store", daemon=True)
            self._writer.start()
        self._queue.put(events)

    def drain(self) -> None:
        """Until everything recorded so far is in Redis."""
        if self._writer is not None:
            self._queue.join()
        if self._failed is not None:
            raise RuntimeError("the dedup store writer failed") from self._failed

    def _write(self) -> None:
        while True:
            batches = [self._queue.get()]
            while len(batches) < QUEUE_BATCHES:  # whatever else is waiting goes in the same call
                try:
                    batches.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                stripes: dict[int, list[bytes]] = {}
                for events in batches:
                    for e in events:
                        en = self.entry(e)
                        stripes.setdefault(en[0] % STRIPES, []).append(en)
                today = int(time.time()) // DAY_S
                args: list[str | int | bytes] = [self.ttl_s]
                for stripe, ens in stripes.items():
                    args += [self.bucket(today, stripe), b"".join(ens)]
                self.patience(functools.partial(self._record, keys=[], args=args))
            except Exception as e:  # surfaced on the worker at its next call, not lost here
                log.exception("dedup store writer")
                self._failed = e
            finally:
                for _ in batches:
                    self._queue.task_done()
