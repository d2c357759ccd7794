"""Prepaid credits drawn down in the stream (SPEC §9.5-9.8).

A grant is an event on the input topic, so it is ordered, snapshotted and replayed with its
tenant's usage: its state lives in the tenant's engine state (`Credits`). When a rated line
is emitted it draws from the tenant's live grants in its currency and meter, in the order
the spec fixes (priority, expiry, effective time, id); a negative correction gives back to
the draws of its meter, cell and period, newest first (never to a grant since expired or
voided). Per grant, always: granted = drawn - returned + expired + voided + remaining.

The emission register settles each line's credits like its amount (the engine's cumulative
credits per register key against what went out), so a crash replay re-emits nothing it
already emitted, and what it would allocate otherwise goes out as a correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from operators.ids import stable_id
from operators.periods import iso
from schemas.events import GrantData
from schemas.outputs import CreditRecord, CreditUse, RatedUsageLine

ZERO = Decimal(0)
NEVER = 2**62  # "no expiry", for ordering
Cell = tuple[str, ...] | None
CreditsToken = tuple[tuple[str, Decimal], ...]  # a register key's cumulative credits per grant, sorted


@dataclass(slots=True)
class Grant:
    grant_id: str
    amount: Decimal
    currency: str
    priority: int
    effective_ms: int
    expires_ms: int | None
    meters: frozenset[str] | None
    seq: int  # order received (ties)
    drawn: Decimal = ZERO
    returned: Decimal = ZERO
    expired: Decimal = ZERO
    voided: Decimal = ZERO
    status: str = "active"  # active, expired, voided
    fired: set[str] = field(default_factory=set)  # credit threshold levels alerted

    @property
    def remaining(self) -> Decimal:
        return self.amount - self.drawn + self.returned - self.expired - self.voided

    @property
    def used(self) -> Decimal:
        return self.drawn - self.returned

    def order(self) -> tuple[int, int, int, str]:
        return (self.priority, NEVER if self.expires_ms is None else self.expires_ms, self.effective_ms, self.grant_id)


@dataclass(slots=True)
class Credits:
    """A tenant's grants, the draws each (meter, cell, period) took (oldest first, with what
    is still outstanding, for returns), and per register key the credits emitted so far."""

    grants: dict[str, Grant] = field(default_factory=dict)
    draws: dict[tuple[str, Cell, str], list[list[object]]] = field(default_factory=dict)
    cum: dict[tuple[str, str, str, Cell], dict[str, Decimal]] = field(default_factory=dict)

    def live(self) -> list[Grant]:
        return [g for g in self.grants.values() if g.status == "active" and g.remaining > 0]


def grant_of(data: GrantData, seq: int) -> Grant:
    """A grant from its event's data (already checked by `check_grant`)."""
    return Grant(
        grant_id=data.grant_id,
        amount=Decimal(data.amount),
        currency=data.currency,
        priority=data.priority,
        effective_ms=_ms(data.effective_at),
        expires_ms=None if data.expires_at is None else _ms(data.expires_at),
        meters=None if data.meters is None else frozenset(data.meters),
        seq=seq,
    )


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000 + 0.0005)


def check_grant(data: GrantData, quantum: Decimal, meters: set[str]) -> str | None:
    """Why a grant cannot be used (the field named), or None."""
    amount = Decimal(data.amount)
    if not amount.is_finite() or amount <= 0:
        return f"data.amount: {amount} is not a positive amount of {data.currency}"
    if amount != amount.quantize(quantum):
        return f"data.amount: {amount} is finer than {data.currency}'s minor unit {quantum}; send it in whole minor units"
    if data.expires_at is not None and data.expires_at <= data.effective_at:
        return "data.expires_at: it is not after effective_at; a grant must be valid for some time"
    unknown = sorted(set(data.meters or ()) - meters)
    if unknown:
        return f"data.meters: {', '.join(unknown[:5])} not in the catalog; name meters by their slug, or leave meters out for all"
    return None


def record(
    kind: str,
    tenant_id: str,
    erp_customer_id: str,
    g: Grant,
    amount: Decimal,
    at_ms: int,
    period: str | None = None,
    legal_entity: str | None = None,
) -> CreditRecord:
    """A grant-level record (granted, expired, voided): its id is the grant's and the kind's."""
    return CreditRecord(
        record_id=stable_id("credit", tenant_id, g.grant_id, kind),
        kind=kind,  # type: ignore[arg-type]
        tenant_id=tenant_id,
        erp_customer_id=erp_customer_id,
        grant_id=g.grant_id,
        amount=amount,
        currency=g.currency,
        at=iso(at_ms),
        period=period,
        legal_entity=legal_entity,
    )


def line_records(ln: RatedUsageLine) -> list[CreditRecord]:
    """The ledger's drawn / returned records of a line's credits (ids from the line's)."""
    return [
        CreditRecord(
            record_id=stable_id("credit", ln.line_id, c.grant_id),
            kind="drawn" if c.amount > 0 else "returned",
            tenant_id=ln.tenant_id,
            erp_customer_id=ln.erp_customer_id,
            grant_id=c.grant_id,
            amount=abs(c.amount),
            currency=ln.currency,
            at=ln.window_start,
            line_id=ln.line_id,
            period=ln.period,
            review=ln.review,
            legal_entity=ln.legal_entity,
        )
        for c in ln.credits or ()
    ]


def apply(cr: Credits, ln: RatedUsageLine, at_ms: int, cell: Cell, *, any_meter: bool = False) -> CreditsToken:
    """Draw a positive line's amount from the live grants that cover it, or give a negative
    one's back to its key's draws, newest first; sets the line's `credits` and `net_amount`
    (when a grant applied) and returns its register key's cumulative credits."""
    key = (ln.meter, ln.period, ln.pricing_version, cell)
    cum = cr.cum.setdefault(key, {})
    uses: list[CreditUse] = []
    if ln.amount > 0:
        rest = ln.amount
        covering = [
            g
            for g in cr.live()
            if g.currency == ln.currency
            and (any_meter or g.meters is None or ln.meter in g.meters)
            and g.effective_ms <= at_ms
            and (g.expires_ms is None or at_ms < g.expires_ms)
        ]
        draws = cr.draws.setdefault((ln.meter, cell, ln.period), [])
        for g in sorted(covering, key=Grant.order):
            take = min(g.remaining, rest)
            if take <= 0:
                continue
            g.drawn += take
            rest -= take
            draws.append([g.grant_id, take])
            uses.append(CreditUse(g.grant_id, take))
            cum[g.grant_id] = cum.get(g.grant_id, ZERO) + take
            if rest == 0:
                break
    elif ln.amount < 0:
        need = -ln.amount
        for d in reversed(cr.draws.get((ln.meter, cell, ln.period), [])):
            gid, outstanding = d[0], d[1]
            assert isinstance(gid, str) and isinstance(outstanding, Decimal)
            g = cr.grants[gid]
            if g.status != "active" or outstanding <= 0:
                continue  # an expired or voided grant is not refilled
            give = min(outstanding, need)
            d[1] = outstanding - give
            g.returned += give
            need -= give
            uses.append(CreditUse(gid, -give))
            cum[gid] = cum.get(gid, ZERO) - give
            if need == 0:
                break
    if uses:
        ln.credits = uses
        ln.net_amount = ln.amount - sum((u.amount for u in uses), ZERO)
    return tuple(sorted((gid, v) for gid, v in cum.items() if v))
