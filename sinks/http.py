"""HTTP destinations: CRM, customer-success webhook and ERP, behind one delivery loop that
applies the policies from `operators.delivery` (rate limit, retries, Retry-After, breaker).

`send` returns only when the request was accepted or rejected for good; while the remote is
down or throttling it keeps waiting, which is what holds the dataflow back (backpressure).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from operators.delivery import Backoff, CircuitBreaker, TokenBucket, classify
from tallyflow.config import Settings
from tallyflow.observability import REQUEST_SECONDS, REQUESTS, RETRIES, circuit_state

log = logging.getLogger(__name__)


@dataclass
class Result:
    ok: bool
    status: int | None
    body: str
    attempts: int


class Destination:
    def __init__(
        self, name: str, base_url: str, rate: float, s: Settings, *, token: str = "", sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.name = name
        self.client = httpx.Client(base_url=base_url, timeout=s.sink_timeout_seconds)
        self.bucket = TokenBucket(rate, burst=1)
        self.backoff = Backoff(s.retry_base_seconds, s.retry_cap_seconds)
        self.breaker = CircuitBreaker(s.breaker_threshold, s.breaker_reset_seconds)
        self.token = token
        self.retry_after_cap = s.retry_after_cap_seconds
        self.sleep = sleep
        self.seconds = REQUEST_SECONDS.labels(name)
        self.counts = {v: REQUESTS.labels(name, v) for v in ("ok", "retry", "reject")}
        self.retried = RETRIES.labels(name)
        circuit_state(name, self.breaker.state)

    def send(self, path: str, body: bytes, headers: dict[str, str]) -> Result:
        hdrs = {"Content-Type": "application/json", **headers}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        attempt = 0
        while True:
            wait_open = self.breaker.wait()
            if wait_open:
                self.sleep(wait_open)
                circuit_state(self.name, self.breaker.state)  # half-open: this request is the probe
            self.sleep(self.bucket.reserve())
            attempt += 1
            t0 = time.perf_counter()
            try:
                r = self.client.post(path, content=body, headers=hdrs)
                status, rh, text = r.status_code, dict(r.headers), r.text
            except httpx.TransportError as e:  # timeouts and connection errors: retry
                status, rh, text = None, {}, f"{type(e).__name__}: {e}"
            self.seconds.observe(time.perf_counter() - t0)
            verdict, wait = classify(status, rh, cap=self.retry_after_cap)
            self.counts[verdict].inc()
            if verdict != "retry":
                self.breaker.success()  # on a reject the remote is up; the request is what is wrong
                circuit_state(self.name, self.breaker.state)
                return Result(verdict == "ok", status, text, attempt)
            self.breaker.failure()
            circuit_state(self.name, self.breaker.state)
            self.retried.inc()
            delay = max(wait or 0.0, self.backoff.delay(attempt))
            log.warning(
                "%s: %s on attempt %d (circuit %s), retrying in %.2fs", self.name, status or text, attempt, self.breaker.state, delay
            )
            self.sleep(delay)

    def close(self) -> None:
        self.client.close()


def sign(key: bytes, body: bytes) -> str:
    """X-Tallyflow-Signature for the success-tool webhook."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def batch_key(line_ids: list[str]) -> str:
    """Idempotency-Key of an ERP batch: the same lines always make the same key."""
    return hashlib.sha256("\n".join(sorted(line_ids)).encode()).hexdigest()[:32]
