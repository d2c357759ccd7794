"""The ERP over HTTP: rated lines and credit ledger records in micro-batches of their own
kind, one idempotency key per batch.

    POST {erp_url}/erp/usage-batches    {"batch_id": key, "lines": [...]}      Idempotency-Key: key
    POST {erp_url}/erp/credit-batches   {"batch_id": key, "credits": [...]}    Idempotency-Key: key

What the ERP books: each line's `amount` is the gross charge (its `credits` and
`net_amount` only say how prepaid credits covered it); the credit records are the money
movements of the grants (`drawn` less `returned` is what credits took off the period's
invoice). Booking a line's `net_amount` as well as the drawn records would count credits twice.

The same items always make the same key (`sinks.courier.batch_key`), and a batch re-sent
after a crash is the same body under the same key (the courier keeps it), which the ERP
recognises; lines and credit records never share a batch, so they never share a key.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from runtime.settings import ErpSettings
from schemas.outputs import ENCODER, CreditRecord, RatedUsageLine
from sinks.base import Answer
from sinks.http import HttpClient

CREDITS = "erp-credits"  # the credit records' courier: its ledger namespace, metrics and parked records


class ErpHttp:
    name = "erp"

    def __init__(self, cfg: ErpSettings, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.http = HttpClient(cfg.url, timeout_s, token=cfg.token, transport=transport)

    def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
        body = ENCODER.encode({"batch_id": key, "lines": items})
        return self.http.post("/erp/usage-batches", body, {"Idempotency-Key": key}, len(items))

    def close(self) -> None:
        self.http.close()


class ErpCreditsHttp:
    """The credit ledger's records to the same ERP, in batches of their own (a courier and a
    ledger namespace of their own, `erp-credits`, sharing the lines' rate limit)."""

    name = CREDITS

    def __init__(self, cfg: ErpSettings, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.http = HttpClient(cfg.url, timeout_s, token=cfg.token, transport=transport)

    def send(self, key: str, items: Sequence[CreditRecord]) -> Answer:
        body = ENCODER.encode({"batch_id": key, "credits": items})
        return self.http.post("/erp/credit-batches", body, {"Idempotency-Key": key}, len(items))

    def close(self) -> None:
        self.http.close()
