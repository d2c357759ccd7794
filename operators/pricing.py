"""Price models over a billing period's cumulative quantity.

A window's amount is `charge(after) - charge(before)` with both sides rounded to the
currency's minor unit, so the lines of a period telescope to exactly the rounded price of
the period's total, whatever the windowing or the arrival order.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

from schemas.catalog import Graduated, Package, PerUnit, PriceModel, Tier, Volume

# ISO 4217 currencies whose minor unit is not 1/100.
_MINOR_UNITS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}
ZERO = Decimal(0)


def quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-_MINOR_UNITS.get(currency, 2))


def _graduated(q: Decimal, tiers: list[Tier]) -> Decimal:
    total, lower = ZERO, ZERO
    for t in tiers:
        if q <= lower:
            break
        upper = q if t.up_to is None else min(q, t.up_to)
        total += (upper - lower) * t.unit_price + t.flat_fee
        lower = upper if t.up_to is None else t.up_to
    return total


def _volume(q: Decimal, tiers: list[Tier]) -> Decimal:
    if q <= 0:
        return ZERO
    for t in tiers:
        if t.up_to is None or q <= t.up_to:
            return q * t.unit_price + t.flat_fee
    raise AssertionError("catalog validation guarantees an open-ended last tier")


def price(model: PriceModel, billable: Decimal) -> Decimal:
    """Unrounded price of `billable` units (quantity above `included`)."""
    if billable <= 0:
        return ZERO
    if isinstance(model, PerUnit):
        return billable * model.unit_price
    if isinstance(model, Graduated):
        return _graduated(billable, model.tiers)
    if isinstance(model, Volume):
        return _volume(billable, model.tiers)
    if isinstance(model, Package):
        packages = (billable / model.package_size).to_integral_value(rounding=ROUND_CEILING)
        return packages * model.package_price
    raise TypeError(f"unknown price model {model!r}")


class Rater:
    """The charge function of one plan meter: included quantity, price model, rounding."""

    __slots__ = ("_cache_q", "_cache_v", "included", "model", "q")

    def __init__(self, model: PriceModel, included: Decimal, currency: str) -> None:
        self.model = model
        self.included = included
        self.q = quantum(currency)
        self._cache_q: Decimal | int | None = None
        self._cache_v = ZERO

    def charge(self, cumulative: Decimal | int) -> Decimal:
        """Rounded charge for a period-to-date quantity; memoises the last call (the next
        window's `before` is the previous window's `after`)."""
        if cumulative == self._cache_q:
            return self._cache_v
        billable = Decimal(cumulative) - self.included
        v = price(self.model, billable).quantize(self.q, rounding=ROUND_HALF_UP) if billable > 0 else ZERO
        self._cache_q, self._cache_v = cumulative, v
        return v
