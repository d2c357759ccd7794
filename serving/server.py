"""How `tallyflow api` runs on uvicorn: with bounds on what a slow or greedy client can hold.

uvicorn bounds idle keep-alive connections and, with `limit_concurrency`, answers 503 past a
number of connections and requests, but it has no header timeout: a connection that sends
its request line and headers a byte at a time (or nothing at all) is kept for as long as
the client likes, and counts against that limit. `BoundedHttp` adds what is missing to
uvicorn's httptools protocol: a request's line and headers must arrive within
`header_seconds` of the connection opening (or of the first byte after a keep-alive
response) and fit in `header_bytes`; otherwise the connection is closed (431 for too much).
The body is bounded by the route that reads it (`body_seconds`, `TALLYFLOW_API_MAX_BODY_BYTES`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runtime.settings import ApiSettings


@dataclass(frozen=True)
class Bounds:
    concurrency: int = 1000  # connections and requests in flight per process; past it 503
    keep_alive_seconds: int = 5  # an idle keep-alive connection is closed after this
    header_seconds: float = 10.0  # request line and headers must arrive within this
    header_bytes: int = 64 * 1024  # request line and headers at most this; past it 431
    body_seconds: float = 60.0  # a posted body must arrive within this (4 MB at 0.5 Mbit/s); past it 408

    @classmethod
    def of(cls, api: ApiSettings) -> Bounds:
        """The bounds `TALLYFLOW_API_*` set."""
        return cls(
            api.limit_concurrency, api.keep_alive_seconds, api.header_timeout_seconds, api.max_header_bytes, api.body_timeout_seconds
        )


BOUNDS = Bounds()


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on request headers."""

    header_seconds: float = Bounds.header_seconds
    header_bytes: int = Bounds.header_bytes

    _deadline: asyncio.TimerHandle | None = None
    _header_size = 0
    _refused = False

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_size = 0
        self._arm()  # a kept-alive connection's next request; the first one's runs since the connection

    def _count(self, n: int) -> bool:
        self._header_size += n
        if self._header_size > self.header_bytes and not self._refused:
            self._refused = True
            self._disarm()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()
        return not self._refused

    def on_url(self, url: bytes) -> None:
        if self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:  # what follows refused headers in the same read is dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()


def config(app: Starlette, host: str, port: int, bounds: Bounds = BOUNDS, **extra: Any) -> uvicorn.Config:
    """The uvicorn configuration `tallyflow api` runs with (no access log: it would hold
    nothing /metrics lacks, and tokens stay out of logs)."""
    protocol = type("BoundedHttp", (BoundedHttp,), {"header_seconds": bounds.header_seconds, "header_bytes": bounds.header_bytes})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=bounds.concurrency,
        timeout_keep_alive=bounds.keep_alive_seconds,
        access_log=False,
        **extra,
    )
