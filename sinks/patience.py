"""Waiting out a Redis outage: the pipeline never proceeds without its ledgers.

Blocking the calling worker is the point: it stops pulling from Kafka, the backlog waits
there as consumer lag, and processing resumes where it stopped when Redis answers again.
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


class Patience:
    """Retries a Redis call with back-off until it succeeds; `up` is exported as a metric."""

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
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
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
