"""ERP invoice states back to the CRM (SPEC §10.3): an ERP's notice of an invoice state made
into the status event of its tenant, or the reason it cannot be (parked for a person).
Framework-free: the API's webhook and a poller of the ERP both call it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime

from operators.catalog_index import CatalogIndex
from operators.ids import stable_id
from operators.periods import iso
from schemas.catalog import Tenant
from schemas.outputs import InvoiceStatus, StatusNotice

WEBHOOK_TOLERANCE_S = 300  # Standard Webhooks: a timestamp further off than this is refused (replays)
_BY_CUSTOMER: list[tuple[CatalogIndex, dict[str, Tenant]]] = []  # the catalog last asked, and its map


def _customers(cat: CatalogIndex) -> dict[str, Tenant]:
    """Tenants by ERP customer id, built once per catalog loaded (a reload is a new index;
    held by reference, so a new index is never taken for the old one)."""
    if not _BY_CUSTOMER or _BY_CUSTOMER[0][0] is not cat:
        _BY_CUSTOMER[:] = [(cat, {ti.tenant.erp_customer_id: ti.tenant for ti in cat.tenants.values()})]
    return _BY_CUSTOMER[0][1]


def secret_bytes(setting: str) -> bytes:
    """A Standard Webhooks key: a spec-form `whsec_<base64>` secret decoded, any other string as is."""
    if setting.startswith("whsec_"):
        b64 = setting.removeprefix("whsec_")
        return base64.b64decode(b64 + "=" * (-len(b64) % 4))
    return setting.encode()


def status_of(cat: CatalogIndex, n: StatusNotice) -> InvoiceStatus | str:
    """The status event of a notice, or why there is none (`unknown_customer: ...`)."""
    tenant = _customers(cat).get(n.erp_customer_id)
    if tenant is None:
        return f"unknown_customer: no tenant of the catalog has erp_customer_id '{n.erp_customer_id}'"
    return InvoiceStatus(
        status_id=stable_id("status", n.invoice_id, n.state),
        invoice_id=n.invoice_id,
        state=n.state,
        tenant_id=tenant.tenant_id,
        crm_account_id=tenant.crm_account_id,
        erp_customer_id=n.erp_customer_id,
        at=iso(_ms(n.at)),
        period=n.period,
        amount=n.amount,
        currency=n.currency,
        legal_entity=tenant.legal_entity,
    )


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000 + 0.0005)


def verify(secret: str, msg_id: str | None, timestamp: str | None, signatures: str | None, body: bytes, now: float | None = None) -> str:
    """Check a Standard Webhooks signature (`v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`,
    the key a `whsec_<base64>` secret or raw); why it is refused, or "" when it is good."""
    if not (msg_id and timestamp and signatures):
        given = {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signatures}
        return "missing " + ", ".join(h for h, v in given.items() if not v)
    now = time.time() if now is None else now
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(now - int(timestamp)) > WEBHOOK_TOLERANCE_S:
        return f"webhook-timestamp is not within {WEBHOOK_TOLERANCE_S} s of now"
    want = b"v1," + base64.b64encode(hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest())
    if not any(hmac.compare_digest(want, s.encode("latin-1")) for s in signatures.split(" ")):
        return "bad webhook-signature"
    return ""
