"""The customer-success tool's webhook: one signed POST per threshold alert.

POST {success_url}/success/webhook    X-Tallyflow-Signature: sha256=<HMAC of the body>
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import httpx

from runtime.settings import SuccessSettings
from schemas.outputs import ENCODER, ThresholdAlert
from sinks.base import Answer
from sinks.http import HttpClient


def sign(key: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class SuccessWebhook:
    name = "success"

    def __init__(self, cfg: SuccessSettings, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.http = HttpClient(cfg.url, timeout_s, transport=transport)
        self.key = cfg.hmac_key.encode()

    def send(self, key: str, items: Sequence[ThresholdAlert]) -> Answer:
        (a,) = items
        body = ENCODER.encode(a)
        # Webhook receivers dedupe on the event id.
        return self.http.post("/success/webhook", body, {"X-Tallyflow-Signature": sign(self.key, body), "Idempotency-Key": key}, 1)

    def close(self) -> None:
        self.http.close()
