"""Output contracts (SPEC §2.3). Money and quantities are Decimal, encoded as strings."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

DeadLetterReason = Literal[
    "invalid_json",  # not JSON, not UTF-8, or an empty message
    "schema",  # JSON, but not a CloudEvent Tallyflow can read (a field missing, too long, of the wrong type)
    "unknown_tenant",  # the subject is not in the catalog, or has no contract in force at the event time
    "unknown_meter",  # no meter of the tenant's plan reads this event type
    "bad_quantity",  # a meter's value is missing, negative, not a number, too large or too precise
    "bad_time",  # event time before the earliest accepted (2000-01-01)
    "future_time",  # event time further ahead of the wall clock than allowed
    "too_large",  # the message is larger than the input limit
    "too_deep",  # arrays and objects nested deeper than the input limit
    "too_late",  # the event's billing period is final (past its grace)
    "unpriced_dimension",  # a matrix-priced meter has no price (cell nor default) for the event's dimension values
    "too_many_cells",  # the event would open more distinct cells of a matrix meter in its period than max_cells
    "bad_grant",  # a credit grant or void that cannot be used (a field named in the message)
    "internal_error",  # a failure of Tallyflow's own on this event (a bug); logged with a stack hash
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
    grant_id: str | None = None  # a credit threshold's grant (level `credit:<pct>`, meter `credits`)
    legal_entity: str | None = None  # the tenant's (SPEC §10.2), where the catalog has entities


class CreditUse(msgspec.Struct, gc=False, array_like=False, frozen=True):
    grant_id: str
    amount: Decimal


class CreditRecord(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """The credit ledger (`usage.credits`, SPEC §9.5): per grant, always granted = drawn −
    returned + expired + voided + remaining. Ids are deterministic; a record that had to
    change after a crash replay goes out again as a correction (`seq` > 1) of the difference."""

    record_id: str
    kind: Literal["granted", "drawn", "returned", "expired", "voided"]
    tenant_id: str
    erp_customer_id: str
    grant_id: str
    amount: Decimal  # positive; its kind says which way it moves the grant
    currency: str
    at: str  # event time: the grant's, the line's window start, the expiry, the void
    line_id: str | None = None  # drawn / returned: the line that did it
    period: str | None = None
    seq: int = 1
    review: str | None = None  # drawn / returned of a line held for review: held with it
    legal_entity: str | None = None  # the tenant's (SPEC §10.2)


class RatedUsageLine(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
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
    # A matrix-priced meter's cell: its dimension values (missing: ""); absent otherwise.
    dimensions: dict[str, str] | None = None
    # Prepaid credits drawn by this line (negative: given back by a lowering correction)
    # and what is left to bill (SPEC §9.5); absent when no grant applied.
    credits: list[CreditUse] | None = None
    net_amount: Decimal | None = None
    kind: Literal["usage", "minimum_true_up"] = "usage"
    # Why a person must approve it before the ERP books it (SPEC §10.1, `code: detail`);
    # absent for a line posted as it comes.
    review: str | None = None
    legal_entity: str | None = None  # the tenant's (SPEC §10.2); absent when the catalog declares no entities

    @property
    def cell(self) -> tuple[str, ...] | None:
        return None if self.dimensions is None else tuple(self.dimensions.values())


class DeadLetter(msgspec.Struct, gc=False, kw_only=True):
    """An input record Tallyflow could not use. `payload` is the original bytes, or a prefix
    of them when they would not fit an output message (`payload_bytes` and `payload_sha256`
    always describe the whole original)."""

    reason: DeadLetterReason
    message: str
    payload: bytes
    payload_bytes: int = 0
    payload_sha256: str = ""
    topic: str
    partition: int
    offset: int
    received_at: str
    index: int | None = None
    event_id: str | None = None
    tenant_id: str | None = None
    # A CloudEvent sent in binary content mode: its `ce_*` and `content-type` headers (the
    # payload is its body), bounded, so it can be read and re-driven as it was sent.
    headers: dict[str, str] | None = None


class HeldItem(msgspec.Struct, gc=False, kw_only=True):
    """A rated line or credit record held for review (`usage.review`, SPEC §10.1): the item
    as rated, waiting for a person's decision. `review_id` is its line or record id."""

    review_id: str
    kind: Literal["line", "credit"]
    tenant_id: str
    period: str | None
    amount: Decimal  # the line's amount; the record's (drawn: taken off the invoice, returned: given back)
    currency: str
    reason: str
    held_at: str
    item: msgspec.Raw  # the line or record, byte for byte as on usage.rated / usage.credits


class ReviewDecision(msgspec.Struct, gc=False, kw_only=True):
    """A person's decision on a held item (`usage.audit`): who, when, why and what. The ERP
    delivery posts an approved item (once: the delivery ledger knows its id) and parks a
    rejected one on `usage.exceptions`."""

    audit_id: str
    review_id: str
    decision: Literal["approve", "reject"]
    by: str
    why: str
    at: str
    kind: Literal["line", "credit"]
    tenant_id: str
    period: str | None
    amount: Decimal
    currency: str
    reason: str  # why it was held
    item: msgspec.Raw


InvoiceState = Literal["draft", "posted", "paid", "cancelled"]


class StatusNotice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What an ERP tells of an invoice (its webhook's body, SPEC §10.3)."""

    invoice_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    erp_customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    state: InvoiceState
    at: Annotated[datetime, msgspec.Meta(tz=True)]
    period: str | None = None
    amount: Decimal | None = None
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")] | None = None


class InvoiceStatus(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """An invoice state the ERP reached (`erp.status`, SPEC §10.3), on its way to the tenant's
    CRM account. `status_id` follows from the invoice and the state, so the same change
    told twice (a webhook retried, a poller restarted) is one change at the CRM."""

    status_id: str
    invoice_id: str
    state: InvoiceState
    tenant_id: str
    crm_account_id: str
    erp_customer_id: str
    at: str  # when the ERP reached the state
    period: str | None = None
    amount: Decimal | None = None
    currency: str | None = None
    legal_entity: str | None = None


ENCODER = msgspec.json.Encoder(decimal_format="string")
