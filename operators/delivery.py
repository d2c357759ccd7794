"""Delivery policy, free of HTTP and Bytewax: rate limiting, retry back-off, circuit
breaking, response classification and micro-batching by size or age."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Clock = Callable[[], float]


class TokenBucket:
    """At most `rate` requests per second on average, `burst` at once."""

    def __init__(self, rate: float, burst: float | None = None, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.clock = clock
        self.stamp = clock()

    def reserve(self) -> float:
        """Take a token; return how long to wait before using it (0 if none)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass
class Backoff:
    """Exponential back-off with full jitter (AWS style): spreads retries of many clients."""

    base: float = 0.2
    cap: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0, min(self.cap, self.base * 2**attempt))


class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures; after `reset_after` seconds one
    probe is let through (half-open); its success closes the circuit, its failure reopens it."""

    def __init__(self, threshold: int = 5, reset_after: float = 5.0, clock: Clock = time.monotonic) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.reset_after else "open"

    def wait(self) -> float:
        """Seconds until a request may be tried (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.reset_after - self.clock())

    def success(self) -> None:
        self.failures, self.opened_at = 0, None

    def failure(self) -> None:
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()  # (re)open: a failed probe waits a full period again


Verdict = Literal["ok", "retry", "reject"]


def classify(
    status: int | None, headers: Mapping[str, str] | None = None, now: float | None = None, cap: float = 300.0
) -> tuple[Verdict, float | None]:
    """What to do with a response: `None` status means a timeout or connection error.
    Returns the verdict and, for 429/503 with Retry-After, the seconds to wait (at most `cap`)."""
    if status is None or status >= 500 or status in (408, 425, 429):
        return "retry", retry_after(headers or {}, now, cap)
    if 200 <= status < 300 or status == 409:  # 409: the remote already has it (idempotency)
        return "ok", None
    return "reject", None


def retry_after(headers: Mapping[str, str], now: float | None = None, cap: float = 300.0) -> float | None:
    """Retry-After as delta-seconds or an HTTP date, within [0, cap]: a remote cannot park a
    worker for longer than we allow (`inf`, `nan` or a date in 2099 wait `cap`)."""
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None:
        return None
    try:
        secs = float(raw)
    except ValueError:
        try:
            secs = parsedate_to_datetime(raw).timestamp() - (now if now is not None else time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    if math.isnan(secs):
        return cap
    return min(cap, max(0.0, secs))


class MicroBatcher(Generic[T]):
    """Closes a batch at `max_items` or when its *first* item is `max_latency` old, whichever
    comes first (unlike a timeout that restarts on every item, the latency stays bounded)."""

    def __init__(self, max_items: int, max_latency: float) -> None:
        self.max_items = max_items
        self.max_latency = max_latency
        self.items: list[T] = []
        self.first_at: float | None = None

    def add(self, item: T, now: float) -> list[T] | None:
        if not self.items:
            self.first_at = now
        self.items.append(item)
        return self.take() if len(self.items) >= self.max_items else None

    def due(self, now: float) -> list[T] | None:
        d = self.deadline()
        return self.take() if d is not None and now >= d else None

    def deadline(self) -> float | None:
        return None if self.first_at is None else self.first_at + self.max_latency

    def take(self) -> list[T]:
        out, self.items, self.first_at = self.items, [], None
        return out
