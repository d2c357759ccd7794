"""Review before posting (SPEC §10.1): which rated lines a person must approve before the
ERP books them, and why. Decided where lines are made (the rating engine), from the
tenant's state there, so a crash replay decides as the first run did and the emission
register keeps the line, its reason included, as first emitted. The ERP delivery only reads
the line's `review`: a held line (and its draws) waits on `usage.review` for a decision."""

from __future__ import annotations

from decimal import Decimal

from schemas.catalog import ReviewRules

KEEP_PERIODS = 3  # periods of emitted gross kept per tenant: the current, the previous, one in grace


def hold_reason(
    rules: ReviewRules | None, tenant_review: bool, amount: Decimal, currency: str, gross_after: Decimal, previous: Decimal | None
) -> str | None:
    """Why a line of `amount` must wait for review (`code: detail`), or None to post it.
    `gross_after` is its tenant's period gross with it, `previous` the previous period's
    (None: no previous period seen, which never counts as a spike)."""
    if tenant_review:
        return "tenant_under_review: the catalog marks this tenant review: true"
    if rules is None:
        return None
    limit = rules.line_amount_over.get(currency)
    if limit is not None and amount > limit:
        return f"amount_over_limit: {currency} {amount} is over the review limit of {currency} {limit} per line"
    n = rules.period_gross_over_previous
    if n is not None and previous is not None and previous > 0 and gross_after > n * previous:
        return f"gross_spike: the period's gross {currency} {gross_after} is over {n} x the previous period's {currency} {previous}"
    return None


def add_gross(emitted: dict[str, Decimal], period: str, amount: Decimal) -> Decimal:
    """Add a line to its period's emitted gross; the period's gross after it. Keeps the last
    KEEP_PERIODS periods (keys sort in time: YYYY-MM, YYYY-MM-DD)."""
    g = emitted[period] = emitted.get(period, Decimal(0)) + amount
    if len(emitted) > KEEP_PERIODS:
        for old in sorted(emitted)[: len(emitted) - KEEP_PERIODS]:
            if old != period:
                del emitted[old]
    return g


CORRECTION = "correction_of_held: its window's first line waits for review; decide them together"


def hold_correction(held: dict[str, set[object]], period: str, window: object, revision: int, why: str | None) -> str | None:
    """A correction is a signed delta of its window's line: posting it while that line waits
    (or was rejected) would bill a change of nothing. So a correction of a held window is
    held too, and a held line's window remembered until its period is final (the engine
    drops it there: no correction can come after)."""
    if why is None:
        if revision and window in held.get(period, ()):
            return CORRECTION
        return None
    held.setdefault(period, set()).add(window)
    return why
