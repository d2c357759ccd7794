"""The read model in Redis: one hash per tenant and billing period, `<prefix>:usage:<tenant>:<period>`,
holding the `UsageFacts` of it (`doc`, compact JSON), its accepted-event count (`n`, for
tools), the tenant's input records it was built from (`r`) and its version (`v`, counted up
by every write that takes it).

The rating dataflow writes it at most once per interval per touched tenant, in script calls
of at most CHUNK documents. A write built from fewer records than the stored one is refused:
after a crash the replay re-derives older states first, and the API must not show usage
going back while it catches up. At as many records it is taken, also where the replay
judged an event otherwise than the process that died (the guard counts input, not
outcomes): the last word is the state that saw the whole input. A document without `r`
(written before it existed) is taken over by the first write. Keys expire `read_model_days`
after their period ends.

Every script call that takes documents announces them, in the same script (so no reader can
see a document before its announcement is on its way): one PUBLISH on `<prefix>:usage`
(`changes_channel`) of the msgpack array `[key, r, v, key, r, v, ...]`. The API keeps what
it derived from each document in memory and drops it when a newer version is announced
(`ReadModelChanges`), so a check asks Redis nothing while its document has not changed. A
version is `(r, v)`: ordered along the input first, then by write, so it only grows for a
key, also after a Redis that lost its data starts counting `v` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import msgspec
import redis.asyncio

from operators.delivery import Backoff
from runtime.redis import Patience, client
from runtime.settings import StoreSettings
from schemas.usage import ENCODER, USAGE_FACTS, UsageFacts

# ARGV: channel, then {key, records, events, doc, expire-at (unix s)}...; returns how many were taken
_WRITE = """
local taken = {}
for i = 2, #ARGV, 5 do
  local k = ARGV[i]
  local cur = redis.call('HGET', k, 'r')
  if (not cur) or tonumber(cur) <= tonumber(ARGV[i + 1]) then
    local v = redis.call('HINCRBY', k, 'v', 1)
    redis.call('HSET', k, 'r', ARGV[i + 1], 'n', ARGV[i + 2], 'doc', ARGV[i + 3])
    redis.call('EXPIREAT', k, ARGV[i + 4])
    taken[#taken + 1] = k
    taken[#taken + 1] = tonumber(ARGV[i + 1])
    taken[#taken + 1] = v
  end
end
if #taken > 0 then
  redis.call('PUBLISH', ARGV[1], cmsgpack.pack(taken))
end
return #taken / 3
"""
# KEYS: documents; returns {r, v} per key (nil for a key without a document)
_VERSIONS = """
local out = {}
for i, k in ipairs(KEYS) do
  local rv = redis.call('HMGET', k, 'r', 'v')
  out[2 * i - 1] = rv[1]
  out[2 * i] = rv[2]
end
return out
"""
log = logging.getLogger(__name__)
CHUNK = 500  # documents per script call: Redis is not held for long by any one


Version = tuple[int, int]  # (r, v): the records it was built from, then its writes; (0, 0): no document
NO_DOCUMENT: Version = (0, 0)


def key(prefix: str, tenant_id: str, period: str) -> str:
    return f"{prefix}:{tenant_id}:{period}"


def changes_channel(prefix: str) -> str:
    """Where writes announce the documents they took (`prefix`: the keys' prefix)."""
    return prefix


class ReadModelWriter:
    """`write` writes now; `submit` hands the documents to a writer thread (in order: one
    thread, one queue), so the worker does not wait on Redis; `flush` waits until all
    submitted documents are written. A full queue (Redis slow or away) blocks `submit`:
    the input waits, as for every store."""

    def __init__(self, store: StoreSettings, on_change: Callable[[bool], None] | None = None, queued: int = 64) -> None:
        self.r = client(store.redis_url)
        self.prefix = store.key("usage")
        self.keep_s = int(store.read_model_days * 86_400)
        self.patience = Patience("read model", on_change=on_change)
        self._write = self.r.register_script(_WRITE)
        self.thread_seconds = 0.0  # time the writer thread spent (its share of the read model's cost)
        self._queue: queue.Queue[list[UsageFacts]] = queue.Queue(maxsize=queued)
        self._thread: threading.Thread | None = None

    def write(self, docs: Iterable[UsageFacts]) -> None:
        args: list[str | bytes | int] = []
        for doc in docs:
            k = key(self.prefix, doc.tenant_id, doc.period)
            args += [k, doc.records, doc.events, ENCODER.encode(doc), doc.end_ms // 1000 + self.keep_s]
        channel = changes_channel(self.prefix)
        for i in range(0, len(args), 5 * CHUNK):
            part = [channel, *args[i : i + 5 * CHUNK]]
            self.patience(partial(self._write, args=part))

    def submit(self, docs: list[UsageFacts]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="read-model-writer", daemon=True)
            self._thread.start()
        self._queue.put(docs)

    def flush(self) -> None:
        self._queue.join()

    def _run(self) -> None:
        while True:
            docs = self._queue.get()
            started = time.thread_time()  # CPU: waiting on Redis or for the GIL costs the process nothing
            try:
                self.write(docs)
            except Exception as e:  # not transient (Patience waits those out): a bug or a misconfiguration
                log.error("read model: %d document(s) not written, their figures stay behind until the next write: %s", len(docs), e)
            finally:
                self.thread_seconds += time.thread_time() - started
                self._queue.task_done()


def documents(store: StoreSettings) -> Iterator[tuple[int, UsageFacts]]:
    """Every document with its event count (a scan: for checks and tools, not hot paths)."""
    r = client(store.redis_url)
    for k in r.scan_iter(match=_glob(store.key("usage")) + ":*", count=1000):
        n, doc = r.hmget(k, ["n", "doc"])  # type: ignore[misc]
        if doc is not None:
            yield int(n or 0), USAGE_FACTS.decode(doc)


class ReadModelReader:
    """For the API: asyncio, so a request waits on Redis without a thread. A Redis that does
    not answer raises `runtime.redis.TRANSIENT` within seconds (one immediate retry, for a
    pooled connection a restarted Redis closed), never after the client's default back-off:
    a request or a probe is answered, not held."""

    def __init__(self, store: StoreSettings) -> None:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.r = redis.asyncio.Redis.from_url(store.redis_url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1))
        self.prefix = store.key("usage")
        self._versions = self.r.register_script(_VERSIONS)

    async def get(self, tenant_id: str, period: str) -> bytes | None:
        return (await self.read(key(self.prefix, tenant_id, period)))[0]

    async def read(self, k: str) -> tuple[bytes | None, Version]:
        """A document (None: there is none) and its version, in one round trip."""
        doc, r, v = await self.r.hmget(k, ("doc", "r", "v"))  # type: ignore[misc]
        if doc is None:
            return None, NO_DOCUMENT
        return doc if isinstance(doc, bytes) else doc.encode(), (int(r or 0), int(v or 0))

    async def versions(self, keys: list[str]) -> list[Version]:
        """The version of each document (NO_DOCUMENT where there is none), in one round trip."""
        flat = await self._versions(keys=keys)
        out: list[Version] = []
        for i in range(0, 2 * len(keys), 2):
            r, v = flat[i], flat[i + 1]
            out.append(NO_DOCUMENT if r is None and v is None else (int(r or 0), int(v or 0)))
        return out

    async def existing(self, tenant_id: str, periods: list[str]) -> list[str]:
        """Those of `periods` with a document, in the order given: exact keys, one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for p in periods:
            pipe.exists(key(self.prefix, tenant_id, p))
        found = await pipe.execute()
        return [p for p, n in zip(periods, found, strict=True) if n]

    async def ping(self) -> None:
        await self.r.ping()  # type: ignore[misc]

    async def close(self) -> None:
        await self.r.aclose()


class ReadModelChanges:
    """The announcements of the read model's writes, for a process that keeps what it derived
    from documents: `run` (a task, until cancelled) subscribes to the changes channel and
    calls `on_change` with the `(key, version)` of every document a write took, and
    `on_live(True)` once subscribed, `on_live(False)` when the subscription is lost, or silent
    for `silent_s` (a PING is sent after `ping_s` without a message, and answered on the same
    connection, so a dead peer shows within seconds); then it subscribes again, with back-off.
    Between `on_live(False)` and the next `on_live(True)` announcements may have been missed."""

    def __init__(
        self,
        store: StoreSettings,
        on_change: Callable[[list[tuple[str, Version]]], None],
        on_live: Callable[[bool], None],
        ping_s: float = 1.0,
        silent_s: float = 3.0,
    ) -> None:
        self.channel = changes_channel(store.key("usage"))
        # RESP2: the subscription's messages are plain replies on the connection (RESP3, redis-py's
        # default, would hand them to a push handler instead).
        self.pool = redis.asyncio.ConnectionPool.from_url(store.redis_url, socket_connect_timeout=2, socket_timeout=silent_s, protocol=2)
        self.on_change, self.on_live = on_change, on_live
        self.ping_s, self.silent_s = ping_s, silent_s
        self.backoff = Backoff(0.2, 5.0)

    async def run(self) -> None:
        attempt = 0
        while True:
            # A bare connection, not redis-py's PubSub: that one reconnects and subscribes again
            # by itself before it reports an error, and announcements missed meanwhile would go
            # unnoticed. Here a lost connection is `on_live(False)` at once.
            conn = self.pool.make_connection()  # type: ignore[no-untyped-call]
            live = False
            try:
                await conn.connect()
                await conn.send_command("SUBSCRIBE", self.channel)
                heard = time.monotonic()
                while True:
                    msg = await conn.read_response(timeout=self.ping_s, disconnect_on_error=False)
                    now = time.monotonic()
                    if msg is None:
                        if now - heard > self.silent_s:
                            raise redis.TimeoutError(f"no answer to PING within {self.silent_s:g} s")
                        await conn.send_command("PING")  # answered as ["pong", ""] while subscribed
                        continue
                    heard = now
                    kind = msg[0]
                    if kind == b"message":
                        self.on_change(_changes(msg[2]))
                    elif kind == b"subscribe":
                        live, attempt = True, 0
                        self.on_live(True)
            except (redis.RedisError, OSError) as e:
                if live:
                    log.warning("read model changes: subscription lost (%s); answers read Redis until it is back", e)
                    live = False
                    self.on_live(False)
            finally:
                if live:  # cancelled
                    self.on_live(False)
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            attempt += 1
            await asyncio.sleep(self.backoff.delay(attempt))  # back-off between subscription attempts


_CHANGES = msgspec.msgpack.Decoder(list[str | int])


def _changes(data: bytes) -> list[tuple[str, Version]]:
    """`[key, r, v, ...]` (msgpack, from the write script) -> [(key, (r, v)), ...]."""
    flat = _CHANGES.decode(data)
    return [(str(flat[i]), (int(flat[i + 1]), int(flat[i + 2]))) for i in range(0, len(flat) - 2, 3)]


def _glob(s: str) -> str:
    """`s` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
