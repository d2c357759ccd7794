"""Redis for every store: one way to connect, and one retry policy.

Waiting out an outage is the point: the calling worker blocks, stops pulling from Kafka,
the backlog waits there as consumer lag, and processing resumes where it stopped when Redis
answers again. Only transient errors are retried (connection loss, timeouts, a replica
still loading, a script still running); anything else (a script error, a wrong type) is a bug or a misconfiguration
and propagates with its message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from operators.delivery import Backoff

log = logging.getLogger(__name__)
R = TypeVar("R")
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def transient(e: BaseException) -> bool:
    """Worth waiting out: connection loss, a timeout, a replica loading, or BUSY (a script,
    perhaps our own retried after a socket timeout, still running: it finishes)."""
    return isinstance(e, TRANSIENT) or (isinstance(e, redis.ResponseError) and str(e).startswith("BUSY"))


def client(url: str) -> redis.Redis:
    """A client with timeouts: a Redis that stops answering is an outage, not a hang."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


class Patience:
    """Retries a Redis call with back-off until it succeeds; `up` is exported as a metric.

    A call that timed out may still have happened (a script runs on after the client gave
    up), so every call made through it must be safe to repeat: reads, idempotent writes, or
    scripts that recognise their own earlier attempt (state/register.py)."""

    def __init__(self, what: str, backoff: Backoff | None = None, on_change: Callable[[bool], None] | None = None) -> None:
        self.what = what
        self.backoff = backoff or Backoff(0.2, 5.0)
        self.on_change = on_change
        self.up = True
        self.outages = 0

    def _set(self, up: bool) -> None:
        self.up = up
        if self.on_change is not None:
            self.on_change(up)

    def __call__(self, fn: Callable[[], R]) -> R:
        attempt = 0
        while True:
            try:
                v = fn()
            except redis.RedisError as e:
                if not transient(e):
                    raise
                attempt += 1
                if self.up:
                    self._set(False)
                    self.outages += 1
                delay = self.backoff.delay(attempt)
                log.error("%s: Redis unreachable (%s); not pulling input, retry in %.1fs", self.what, e, delay)
                time.sleep(delay)  # back-off between attempts, not synchronisation
                continue
            if not self.up:
                log.warning("%s: Redis is back after %d attempt(s); resuming", self.what, attempt)
                self._set(True)
            return v
