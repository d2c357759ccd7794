"""The read model in Redis: one hash per tenant and billing period, `<prefix>:usage:<tenant>:<period>`,
holding the `UsageFacts` of it (`doc`, compact JSON), its accepted-event count (`n`, for
tools) and the tenant's input records it was built from (`r`).

The rating dataflow writes it at most once per interval per touched tenant, in script calls
of at most CHUNK documents. A write built from fewer records than the stored one is refused:
after a crash the replay re-derives older states first, and the API must not show usage
going back while it catches up. At as many records it is taken, also where the replay
judged an event otherwise than the process that died (the guard counts input, not
outcomes): the last word is the state that saw the whole input. A document without `r`
(written before it existed) is taken over by the first write. Keys expire `read_model_days`
after their period ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import redis.asyncio

from runtime.redis import Patience, client
from runtime.settings import StoreSettings
from schemas.usage import ENCODER, USAGE_FACTS, UsageFacts

# ARGV: {key, records, events, doc, expire-at (unix s)}...
_WRITE = """
for i = 1, #ARGV, 5 do
  local k = ARGV[i]
  local cur = redis.call('HGET', k, 'r')
  if (not cur) or tonumber(cur) <= tonumber(ARGV[i + 1]) then
    redis.call('HSET', k, 'r', ARGV[i + 1], 'n', ARGV[i + 2], 'doc', ARGV[i + 3])
    redis.call('EXPIREAT', k, ARGV[i + 4])
  end
end
return 0
"""
log = logging.getLogger(__name__)
CHUNK = 500  # documents per script call: Redis is not held for long by any one


def key(prefix: str, tenant_id: str, period: str) -> str:
    return f"{prefix}:{tenant_id}:{period}"


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
        for i in range(0, len(args), 5 * CHUNK):
            part = args[i : i + 5 * CHUNK]
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

    async def get(self, tenant_id: str, period: str) -> bytes | None:
        v = await self.r.hget(key(self.prefix, tenant_id, period), "doc")  # type: ignore[misc]
        return v if isinstance(v, bytes) or v is None else v.encode()

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


def _glob(s: str) -> str:
    """`s` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
