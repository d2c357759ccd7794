"""The read model's contracts: what the rating dataflow writes (`UsageFacts`, compact) and
what the usage and entitlement API answers (`TenantUsage`, `Entitlement`).

Quantities and money are Decimal, encoded as strings (as on every output topic); times are
RFC 3339 UTC in answers, epoch milliseconds in facts.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec


class VersionFacts(msgspec.Struct, array_like=True, gc=False):
    pricing_version: str
    quantity: Decimal  # every accepted event under this version
    rated_quantity: Decimal  # of it, in windows closed so far
    events: int
    fee: Decimal | None = None  # a percentage meter's exact fees of `quantity` (its amount is their rounded sum)
    rated_fee: Decimal | None = None  # of them, in windows closed so far


class CellFacts(msgspec.Struct, array_like=True, gc=False):
    """One cell of a matrix meter under one pricing version (its own price and lines)."""

    cell: list[str]  # the dimension values, in the meter's order
    pricing_version: str
    quantity: Decimal
    rated_quantity: Decimal
    events: int


class LevelFacts(msgspec.Struct, array_like=True, gc=False):
    pricing_version: str
    level: str
    crossed_ms: int | None  # event time of the event that reached it (None: state older than the read model)


class GrantFacts(msgspec.Struct, array_like=True, gc=False):
    """A prepaid grant of the tenant as of the document (SPEC §9.5): per grant, granted =
    drawn - returned + expired + voided + remaining."""

    grant_id: str
    amount: Decimal
    currency: str
    priority: int
    effective_ms: int
    expires_ms: int | None
    meters: list[str] | None
    drawn: Decimal
    returned: Decimal
    expired: Decimal
    voided: Decimal
    status: str  # active, expired, voided


class MeterFacts(msgspec.Struct, array_like=True, gc=False):
    meter: str
    last_ms: int | None
    versions: list[VersionFacts]  # a matrix meter's: its totals over all cells
    levels: list[LevelFacts]
    cells: list[CellFacts] = []


class UsageFacts(msgspec.Struct, array_like=True, gc=False):
    """What the rating dataflow writes to the read model: what only it knows, per tenant and
    billing period. Money, included, remaining and access are functions of these and of the
    (immutable) pricing versions, derived where they are read (operators/usage.py)."""

    tenant_id: str
    period: str
    kind: str  # billing period kind: month or day
    start_ms: int
    end_ms: int
    watermark_ms: int
    as_of_ms: int
    events: int  # accepted events in the period (all meters)
    meters: list[MeterFacts]
    # The tenant's input records that reached rating so far (accepted, duplicates, too late):
    # a position along the input, whatever each was judged, so the store's guard against
    # older states. 0 in documents written before it existed.
    records: int = 0
    # The period closed below its plan's minimum: the true-up line's version and amount.
    true_up_version: str | None = None
    true_up: Decimal | None = None
    grants: list[GrantFacts] = []  # the tenant's prepaid grants as of this document (every period's)


class LevelCrossed(msgspec.Struct, kw_only=True, gc=False):
    level: str
    limit: Decimal
    pricing_version: str
    crossed_at: str | None  # event time of the event that reached it (unknown for state older than the read model)


class VersionUsage(msgspec.Struct, kw_only=True, gc=False):
    """Usage rated under one pricing version: after a mid-period plan change each version's
    `included` applies to the usage under it alone (SPEC §2.2)."""

    pricing_version: str
    plan_id: str
    plan_version: int
    quantity: Decimal
    included: Decimal
    amount: Decimal  # price of `quantity` (open windows included)
    amount_rated: Decimal  # in closed windows: already on usage.rated
    events: int


class CellUsage(msgspec.Struct, kw_only=True, gc=False):
    """A matrix meter's usage in one cell (one combination of dimension values) under one
    pricing version: priced at the cell's unit price, rated on lines of its own."""

    dimensions: dict[str, str]
    pricing_version: str
    quantity: Decimal
    amount: Decimal
    amount_rated: Decimal
    events: int


class MeterUsage(msgspec.Struct, kw_only=True, gc=False):
    meter: str
    currency: str
    quantity: Decimal  # period to date, every accepted event, all pricing versions (what reconcile sums)
    amount: Decimal  # what the period's rated lines add up to once its windows close
    amount_rated: Decimal  # of it, in windows closed so far (on usage.rated, on their way to the ERP)
    pricing_version: str  # in force at the tenant's watermark: `used` .. `has_access` are measured under it
    included: Decimal
    used: Decimal
    remaining: Decimal
    overage: Decimal
    hard_limit: Decimal | None  # None: soft (overage is billed, access stays open)
    has_access: bool
    events: int
    last_event_time: str | None
    levels: list[LevelCrossed]
    versions: list[VersionUsage]
    cells: list[CellUsage] = []  # a matrix meter's breakdown (empty for other meters)


class GrantBalance(msgspec.Struct, kw_only=True, gc=False):
    """A prepaid grant for people and services (`GET /v1/tenants/{t}/credits`)."""

    grant_id: str
    currency: str
    granted: Decimal
    used: Decimal  # drawn by rated lines, net of what corrections gave back
    expired: Decimal
    voided: Decimal
    remaining: Decimal
    priority: int
    effective_at: str
    expires_at: str | None
    meters: list[str] | None
    status: str


class TenantUsage(msgspec.Struct, kw_only=True, gc=False):
    tenant_id: str
    period: str
    period_start: str
    period_end: str
    watermark: str | None  # the tenant's latest event time this reflects (None: no usage in the period yet)
    as_of: str  # wall time it was computed
    events: int  # accepted events in the period (all meters): grows along the input, so a replay never goes back
    meters: dict[str, MeterUsage]
    credits: list[GrantBalance] = []  # the tenant's prepaid grants as of this document (SPEC §9.5)


class Entitlement(msgspec.Struct, kw_only=True):
    tenant_id: str
    meter: str
    period: str
    has_access: bool
    included: Decimal
    used: Decimal
    remaining: Decimal
    overage: Decimal
    hard_limit: Decimal | None
    pricing_version: str
    as_of: str  # when the figures were computed (the read model's time; now when there is no usage yet)
    watermark: str | None  # the latest event time they reflect (None: no usage in the period yet)
    currency: str | None = None  # the plan meter's
    credits_remaining: Decimal = Decimal(0)  # what the tenant's live prepaid grants still cover of this meter, in `currency`


class Credits(msgspec.Struct, kw_only=True, gc=False):
    """`GET /v1/tenants/{t}/credits`: the tenant's prepaid grants as of the read model."""

    tenant_id: str
    period: str  # the billing period whose document the balances come from
    as_of: str | None  # when the rating dataflow wrote them (None: no document, no grants seen)
    watermark: str | None
    remaining: dict[str, Decimal]  # per currency, over the live grants
    grants: list[GrantBalance]


ENCODER = msgspec.json.Encoder(decimal_format="string")
TENANT_USAGE = msgspec.json.Decoder(TenantUsage)
USAGE_FACTS = msgspec.json.Decoder(UsageFacts)
