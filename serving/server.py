"""How `tallyflow api` runs on uvicorn: with bounds on what a slow or greedy client can hold.

uvicorn bounds idle keep-alive connections and, with `limit_concurrency`, answers 503 past a
number of connections and requests, but it has no header timeout: a connection that sends
its request line and headers a byte at a time (or nothing at all) is kept for as long as
the client likes, and counts against that limit. `BoundedHttp` adds what is missing to
uvicorn's httptools protocol: a request's line and headers must arrive within
`header_seconds` of the connection opening (or of the first byte after a keep-alive
response) and fit in `header_bytes`; otherwise the connection is closed (431 for too much).
The body is bounded by the route that reads it (`body_seconds`, `TALLYFLOW_API_MAX_BODY_BYTES`).

`serve` runs an app as `tallyflow api` does, in one process or in several **workers** behind
one port: the parent binds the listening socket and starts each worker (a fresh interpreter,
`spawn`) with it; every worker builds its own app (catalog, Redis connections, producer,
cache of answers and its own subscription to the read model's announcements, so each stays
as fresh as the announcements) and accepts connections from the shared socket, so the
kernel spreads connections over the workers. A worker that dies is started again; SIGTERM
or SIGINT stop them all, each finishing the requests it has. Their metrics are summed over
the workers (prometheus-client's multiprocess mode, in a directory of their own), so
/metrics answers for the whole process tree whichever worker serves it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runtime.settings import ApiSettings, Settings, tune_gc

log = logging.getLogger(__name__)
APP = "serving.app:build_app"  # what `tallyflow api` serves: a factory of Settings
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode (workers > 1)
QUICK_EXIT_S = 10.0  # a worker that exits this soon after its start failed to start: stop, do not loop


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


def config(app: ASGIApp, host: str, port: int, bounds: Bounds = BOUNDS, **extra: Any) -> uvicorn.Config:
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


def serve(s: Settings, host: str, port: int, workers: int = 1, app: str = APP, log_level: str = "info") -> int:
    """Serve `app` (`module:factory`, a function of Settings returning the ASGI app) on
    `host:port` with the bounds of `s.api`, in `workers` processes (1: this one); the exit
    code when it stops."""
    if workers <= 1:
        _worker(app, s, None, host, port, log_level)
        return 0
    _factory(app)  # an app that cannot be imported stops here, once, not in every worker
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    own_dir = MULTIPROC_DIR not in os.environ
    if own_dir:  # read by prometheus-client when each worker imports it
        os.environ[MULTIPROC_DIR] = tempfile.mkdtemp(prefix="tallyflow-api-metrics-")
    ctx = multiprocessing.get_context("spawn")
    stopping: list[int] = []

    def stop(signum: int, _: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: list[multiprocessing.process.BaseProcess] = []
    started: list[float] = []
    code = 0
    try:

        def start(i: int) -> multiprocessing.process.BaseProcess:
            p = ctx.Process(target=_worker, args=(app, s, sock, host, port, log_level), name=f"tallyflow-api-{i}", daemon=False)
            p.start()
            return p

        for i in range(workers):
            procs.append(start(i))
            started.append(time.monotonic())
        log.info("tallyflow api: %d workers on %s:%d (pids %s)", workers, host, port, ", ".join(str(p.pid) for p in procs))
        while not stopping:
            wait([p.sentinel for p in procs], timeout=1.0)
            for i, p in enumerate(procs):
                if p.is_alive() or stopping:
                    continue
                _mark_dead(p.pid)
                if time.monotonic() - started[i] < QUICK_EXIT_S:
                    log.error("tallyflow api: worker %s exited with %s as it started; stopping", p.pid, p.exitcode)
                    code = p.exitcode or 1
                    stopping.append(0)
                    break
                log.error("tallyflow api: worker %s exited with %s; starting another", p.pid, p.exitcode)
                procs[i], started[i] = start(i), time.monotonic()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then the app's shutdown
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_dir:
            shutil.rmtree(os.environ.pop(MULTIPROC_DIR), ignore_errors=True)
    return code


def _factory(app: str) -> Callable[[Settings], ASGIApp]:
    module, _, name = app.partition(":")
    fn: Callable[[Settings], ASGIApp] = getattr(importlib.import_module(module), name)
    return fn


def _worker(app: str, s: Settings, sock: socket.socket | None, host: str, port: int, log_level: str) -> None:
    """One worker: its own app, served on the shared socket (or bound here, alone)."""
    bounds = Bounds.of(s.api)
    built = _factory(app)(s)
    tune_gc()  # the catalog is long-lived: freeze it, so collections do not pause requests rescanning it
    uvicorn.Server(config(built, host, port, bounds, log_level=log_level)).run(sockets=[sock] if sock is not None else None)


def _mark_dead(pid: int | None) -> None:
    """A dead worker's live gauges leave the sums (its counters stay counted)."""
    if pid is not None and MULTIPROC_DIR in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
