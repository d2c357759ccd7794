"""The customer-success tool's webhook: one POST per threshold alert, signed per Standard
Webhooks (https://www.standardwebhooks.com/), so a receiver can prove it came from us and
refuse a captured request replayed later.

    POST {success_url}/success/webhook
    webhook-id: <alert id>             the same on every retry: receivers dedupe on it
    webhook-timestamp: <unix seconds>  of this attempt: receivers refuse one too far off
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>

The secret is TALLYFLOW_SUCCESS_HMAC_KEY: `whsec_<base64>` as the spec writes secrets, or
any other string taken as raw bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

import httpx

from operators.status import secret_bytes
from runtime.settings import SuccessSettings
from schemas.outputs import ENCODER, ThresholdAlert
from sinks.base import Answer
from sinks.http import HttpClient


def sign(secret_key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC>` over id, timestamp and body: binding the timestamp is what lets a
    receiver refuse a captured request replayed later, and the id one delivered twice."""
    mac = hmac.new(secret_key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class SuccessWebhook:
    name = "success"

    def __init__(
        self,
        cfg: SuccessSettings,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.http = HttpClient(cfg.url, timeout_s, transport=transport)
        self.secret = secret_bytes(cfg.hmac_key)
        self.clock = clock

    def send(self, key: str, items: Sequence[ThresholdAlert]) -> Answer:
        (a,) = items
        body = ENCODER.encode(a)
        ts = int(self.clock())
        headers = {
            "webhook-id": key,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(self.secret, key, ts, body),
            "Idempotency-Key": key,
        }
        return self.http.post("/success/webhook", body, headers, 1)

    def close(self) -> None:
        self.http.close()
