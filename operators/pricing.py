"""Price models over a billing period's cumulative quantity.

A window's amount is `charge(after) - charge(before)` with both sides rounded to the
currency's minor unit, so the lines of a period telescope to exactly the rounded price of
the period's total, whatever the windowing or the arrival order. A percentage meter
telescopes the same way on its period-to-date fee (`FeeRater`); a matrix meter is one
per-unit price per cell (`cell_price`), each cell rated on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow

from operators import DECIMAL_PRECISION
from schemas.catalog import Graduated, Matrix, Package, Percentage, PerUnit, PriceModel, Tier, Volume
from schemas.catalog import quantum as quantum  # the minor-unit table lives with the catalog, which checks amounts against it

ZERO = Decimal(0)
# Fees are computed in their own context, whatever the calling thread's: wide enough for any
# bounded value x rate + fee (operators/__init__.py), and trapping Inexact, so a fee that
# could not be exact raises instead of being rounded silently.
_EXACT = Context(prec=DECIMAL_PRECISION, traps=[Inexact, InvalidOperation, Overflow, DivisionByZero])
_ROUND = Context(prec=DECIMAL_PRECISION, traps=[InvalidOperation, Overflow, DivisionByZero])  # quantizing rounds by design


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
    if isinstance(model, Matrix):
        raise TypeError("a matrix meter has no price of its total: price each cell with PerUnit(cell_price(model, dims))")
    if isinstance(model, Percentage):
        raise TypeError("a percentage meter is priced by its events' fees, not its quantity: sum fee() per event, rate with FeeRater")
    raise TypeError(f"unknown price model {model!r}")


def fee(model: Percentage, value: Decimal | int) -> Decimal:
    """One event's exact fee, `min(max(value x rate + fixed_fee, min_fee), max_fee)`: never
    rounded, since the period's charge is the rounded sum of its fees (SPEC §9.2)."""
    v = _EXACT.add(_EXACT.multiply(Decimal(value), model.rate), model.fixed_fee)
    if model.min_fee is not None and v < model.min_fee:
        v = model.min_fee
    if model.max_fee is not None and v > model.max_fee:
        v = model.max_fee
    return v


def cell_price(model: Matrix, dims: Mapping[str, str]) -> Decimal | None:
    """The unit price of the cell with these dimension values: the first rule whose `when`
    they include (exact string equality), else the default; None when neither applies (the
    event is then `unpriced_dimension`)."""
    for c in model.cells:
        if all(dims.get(k) == v for k, v in c.when.items()):
            return c.unit_price
    return model.default_unit_price


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


class FeeRater:
    """The charge of a percentage meter: its period-to-date exact fee rounded HALF_UP to the
    minor unit. Lines are `charge(after) - charge(before)` as with `Rater`, so they telescope
    to the rounded period fee however the events fall into windows."""

    __slots__ = ("_cache_f", "_cache_v", "q")
    included = ZERO  # percentage refuses `included`: what Rater users read is always 0

    def __init__(self, currency: str) -> None:
        self.q = quantum(currency)
        self._cache_f: Decimal | int | None = None
        self._cache_v = ZERO

    def charge(self, cumulative_fee: Decimal | int) -> Decimal:
        """Rounded charge for a period-to-date fee; memoises the last call like `Rater`."""
        if cumulative_fee == self._cache_f:
            return self._cache_v
        v = Decimal(cumulative_fee).quantize(self.q, rounding=ROUND_HALF_UP, context=_ROUND)
        self._cache_f, self._cache_v = cumulative_fee, v
        return v
