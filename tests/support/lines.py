"""One builder of rated lines and one of threshold alerts for every test: acme's calls in
2026-03 under basic:v1, with whatever a test cares about overridden."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from schemas.outputs import RatedUsageLine, ThresholdAlert

T = "2026-03-10T12:00:00.000Z"


def rated_line(**overrides: Any) -> RatedUsageLine:
    """Strings for quantity and amount are taken as Decimals; `at` sets every timestamp."""
    at = overrides.pop("at", T)
    fields: dict[str, Any] = {
        "line_id": str(uuid.uuid4()),
        "tenant_id": "acme",
        "erp_customer_id": "ERP-1",
        "contract_id": "C-1",
        "product_code": "CALLS",
        "meter": "calls",
        "quantity": Decimal(1),
        "amount": Decimal(0),
        "currency": "USD",
        "window_start": at,
        "window_end": at,
        "period": at[:7],
        "pricing_version": "basic:v1",
        "event_count": 1,
        "first_event_time": at,
        "last_event_time": at,
        "revision": 0,
    }
    fields.update(overrides)
    fields["quantity"], fields["amount"] = Decimal(fields["quantity"]), Decimal(fields["amount"])
    return RatedUsageLine(**fields)


def threshold_alert(**overrides: Any) -> ThresholdAlert:
    """acme crossing 80 % of basic's 100 calls; strings for limit and usage are Decimals."""
    fields: dict[str, Any] = {
        "alert_id": str(uuid.uuid4()),
        "tenant_id": "acme",
        "crm_account_id": "CRM-1",
        "meter": "calls",
        "period": T[:7],
        "level": "80%",
        "limit": Decimal(80),
        "usage": Decimal(81),
        "crossed_at": T,
        "correlation_id": "e-1",
        "plan_id": "basic",
        "plan_version": 1,
        "detected_at": T,
        "destinations": ["crm", "success"],
    }
    fields.update(overrides)
    fields["limit"], fields["usage"] = Decimal(fields["limit"]), Decimal(fields["usage"])
    return ThresholdAlert(**fields)
