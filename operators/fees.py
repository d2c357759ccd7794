"""What a percentage meter keeps: the sum of its events' values (the quantity on the line)
and the sum of their fees, each `min(max(value x rate + fixed_fee, min_fee), max_fee)`
exact (SPEC §9.2). The fee of a sum is not the sum of fees once fixed fees or clamps are in
play, so the fees are summed event by event and the lines telescope on their rounded sum."""

from __future__ import annotations

from decimal import Decimal

from operators.pricing import fee
from schemas.catalog import Percentage


class FeeSumAgg:
    __slots__ = ("fee", "model", "v")

    def __init__(self, model: Percentage) -> None:
        self.model = model
        self.v: int | Decimal = 0
        self.fee: Decimal = Decimal(0)

    def add(self, v: int | Decimal, ts_ms: int) -> None:
        self.v += v
        self.fee += fee(self.model, v)

    def merge(self, other: FeeSumAgg) -> None:
        self.v += other.v
        self.fee += other.fee

    def value(self) -> int | Decimal:
        return self.v
