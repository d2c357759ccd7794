"""Output contracts (SPEC §2.3). Money and quantities are Decimal, encoded as strings."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

DeadLetterReason = Literal[
    "invalid_json",
    "schema",
    "unknown_tenant",
    "unknown_meter",
    "bad_quantity",
    "too_late",
]
Destination = Literal["crm", "success"]


class ThresholdAlert(msgspec.Struct, gc=False, kw_only=True):
    alert_id: str
    tenant_id: str
    crm_account_id: str
    meter: str
    period: str
    level: str
    limit: Decimal
    usage: Decimal
    crossed_at: str
    correlation_id: str
    plan_id: str
    plan_version: int
    detected_at: str
    destinations: list[Destination]
    sustained_periods: int | None = None


class RatedUsageLine(msgspec.Struct, gc=False, kw_only=True):
    line_id: str
    tenant_id: str
    erp_customer_id: str
    contract_id: str
    product_code: str
    meter: str
    quantity: Decimal
    amount: Decimal
    currency: str
    window_start: str
    window_end: str
    period: str
    pricing_version: str
    event_count: int
    first_event_time: str
    last_event_time: str
    revision: int


class DeadLetter(msgspec.Struct, gc=False, kw_only=True):
    reason: DeadLetterReason
    message: str
    payload: bytes
    topic: str
    partition: int
    offset: int
    received_at: str
    index: int | None = None
    event_id: str | None = None
    tenant_id: str | None = None


ENCODER = msgspec.json.Encoder(decimal_format="string")
