"""The CRM over HTTP: one signal per threshold alert on the tenant's CRM account, and the
invoice states the ERP reached (SPEC §10.3) as the account's billing status.

POST {crm_url}/crm/accounts/{crm_account_id}/signals           Idempotency-Key: alert_id
POST {crm_url}/crm/accounts/{crm_account_id}/billing-status    Idempotency-Key: status_id
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from runtime.settings import CrmSettings
from schemas.outputs import ENCODER, InvoiceStatus, ThresholdAlert
from sinks.base import Answer
from sinks.http import HttpClient


class CrmHttp:
    name = "crm"

    def __init__(self, cfg: CrmSettings, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.http = HttpClient(cfg.url, timeout_s, token=cfg.token, transport=transport)

    def send(self, key: str, items: Sequence[ThresholdAlert]) -> Answer:
        (a,) = items  # one alert per request: each is delivered the moment it is read
        return self.http.post(f"/crm/accounts/{a.crm_account_id}/signals", ENCODER.encode(a), {"Idempotency-Key": key}, 1)

    def close(self) -> None:
        self.http.close()


class CrmStatusHttp:
    """An invoice's state on the tenant's CRM account, once per state change (`crm-status`
    in the delivery ledger, by `status_id`)."""

    name = "crm-status"

    def __init__(self, cfg: CrmSettings, timeout_s: float, transport: httpx.BaseTransport | None = None) -> None:
        self.http = HttpClient(cfg.url, timeout_s, token=cfg.token, transport=transport)

    def send(self, key: str, items: Sequence[InvoiceStatus]) -> Answer:
        (st,) = items
        return self.http.post(f"/crm/accounts/{st.crm_account_id}/billing-status", ENCODER.encode(st), {"Idempotency-Key": key}, 1)

    def close(self) -> None:
        self.http.close()
