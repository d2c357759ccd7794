"""The ERP over HTTP: rated lines in micro-batches, one idempotency key per batch.

    POST {erp_url}/erp/usage-batches    {"batch_id": key, "lines": [...]}    Idempotency-Key: key

The same lines always make the same key (`sinks.courier.batch_key`), and a batch re-sent after a crash is
the same body under the same key (the courier keeps it), which the ERP recognises.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from runtime.settings import ErpSettings
from schemas.outputs import ENCODER, RatedUsageLine
from sinks.base import Answer
from sinks.http import HttpClient


class ErpHttp:
    name = "erp"

    def __init__(self, cfg: ErpSettings, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.http = HttpClient(cfg.url, timeout_s, token=cfg.token, transport=transport)

    def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
        body = ENCODER.encode({"batch_id": key, "lines": items})
        return self.http.post("/erp/usage-batches", body, {"Idempotency-Key": key}, len(items))

    def close(self) -> None:
        self.http.close()
