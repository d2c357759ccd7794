"""Aggregations over a set of events, mergeable so windows fold into period totals."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

AVG_PLACES = 9  # an AVG is billed to 9 decimal places, HALF_UP (SPEC §9.3)


class Agg(Protocol):
    def add(self, v: Any, ts_ms: int) -> None: ...
    def merge(self, other: Any) -> None: ...
    def value(self) -> int | Decimal: ...


class SumAgg:
    """SUM and COUNT (COUNT events carry the value 1)."""

    __slots__ = ("v",)

    def __init__(self) -> None:
        self.v: int | Decimal = 0

    def add(self, v: int | Decimal, ts_ms: int) -> None:
        self.v += v

    def merge(self, other: SumAgg) -> None:
        self.v += other.v

    def value(self) -> int | Decimal:
        return self.v


class MaxAgg:
    __slots__ = ("v",)

    def __init__(self) -> None:
        self.v: int | Decimal = 0

    def add(self, v: int | Decimal, ts_ms: int) -> None:
        if v > self.v:
            self.v = v

    def merge(self, other: MaxAgg) -> None:
        self.add(other.v, 0)

    def value(self) -> int | Decimal:
        return self.v


class AvgAgg:
    """AVG: the mean of the values. Keeps the exact sum and count (not a running mean) so
    windows merge into the period's mean exactly; the mean is rounded once, on reading."""

    __slots__ = ("n", "s")

    def __init__(self) -> None:
        self.s: int | Decimal = 0
        self.n = 0

    def add(self, v: int | Decimal, ts_ms: int) -> None:
        self.s += v
        self.n += 1

    def merge(self, other: AvgAgg) -> None:
        self.s += other.s
        self.n += other.n

    def value(self) -> Decimal:
        """sum / count to 9 decimal places, HALF_UP, in integers: exact whatever the count or
        the Decimal context (no double rounding through a finite-precision quotient)."""
        if not self.n:
            return Decimal(0)
        num, den = Decimal(self.s).as_integer_ratio()
        den *= self.n
        q, r = divmod(num * 10**AVG_PLACES, den)
        return Decimal(q + (2 * r >= den)).scaleb(-AVG_PLACES)


class MinAgg:
    """MIN: the smallest value. Empty is None (not 0), so merging an empty window keeps the
    minimum; reads as 0 when nothing was added, like the other aggregations."""

    __slots__ = ("v",)

    def __init__(self) -> None:
        self.v: int | Decimal | None = None

    def add(self, v: int | Decimal, ts_ms: int) -> None:
        if self.v is None or v < self.v:
            self.v = v

    def merge(self, other: MinAgg) -> None:
        if other.v is not None:
            self.add(other.v, 0)

    def value(self) -> int | Decimal:
        return 0 if self.v is None else self.v


class UniqueAgg:
    __slots__ = ("s",)

    def __init__(self) -> None:
        self.s: set[str | int] = set()

    def add(self, v: str | int, ts_ms: int) -> None:
        self.s.add(v)

    def merge(self, other: UniqueAgg) -> None:
        self.s |= other.s

    def value(self) -> int:
        return len(self.s)


class LatestAgg:
    """The value of the event with the greatest event time (ties: the later arrival)."""

    __slots__ = ("ts", "v")

    def __init__(self) -> None:
        self.ts = -(2**63)
        self.v: int | Decimal = 0

    def add(self, v: int | Decimal, ts_ms: int) -> None:
        if ts_ms >= self.ts:
            self.ts, self.v = ts_ms, v

    def merge(self, other: LatestAgg) -> None:
        self.add(other.v, other.ts)

    def value(self) -> int | Decimal:
        return self.v


AGGREGATIONS: dict[str, Callable[[], Agg]] = {
    "SUM": SumAgg,
    "COUNT": SumAgg,
    "MAX": MaxAgg,
    "UNIQUE_COUNT": UniqueAgg,
    "LATEST": LatestAgg,
    "AVG": AvgAgg,
    "MIN": MinAgg,
}
