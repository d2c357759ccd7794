"""Aggregations over a set of events, mergeable so windows fold into period totals."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol


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
}
