"""The state one shard engine keeps per tenant, and what it hands back per batch.

Snapshotted by the rating dataflow at every epoch for every touched shard, so kept small:
period-to-date aggregates, the windows still open, dedup generations, fired levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from operators.aggregate import Agg
from operators.credits import Credits
from operators.dedup import Evicted, GenerationalDedup
from operators.periods import Period
from schemas.outputs import CreditRecord, DeadLetter, RatedUsageLine, ThresholdAlert

INF = Decimal("Infinity")
Question = tuple[str, int, int, int]  # to the long-horizon dedup store: tenant, hash, event time ms, read position


class Backstop(Protocol):
    """Long-horizon dedup behind the in-memory window (state.dedup_store.DedupStore): it is
    handed every generation that leaves memory, and asked only about events memory cannot
    judge."""

    def duplicates(self, questions: Sequence[Question]) -> set[int]:
        """Indices of the questions (tenant, dedup hash, event time ms, read position) whose
        id it holds from another position (the same position is the same message read again,
        not a duplicate)."""
        ...

    def evicted(self, gone: list[Evicted]) -> None:
        """Generations that left memory (may be written later, but answered for at once)."""
        ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    window_ms: int = 60_000
    allowed_lateness_ms: int = 0  # windows close at watermark - lateness
    grace_ms: int = 3_600_000  # corrections accepted until period end + grace
    dedup_horizon_ms: int = 3_600_000
    idle_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.window_ms <= 0:
            raise ValueError("window must be positive")
        if self.grace_ms < self.allowed_lateness_ms:
            raise ValueError("grace must be at least the allowed lateness, or windows could close after their period is final")


@dataclass(slots=True)
class WindowAcc:
    agg: Agg
    start_ms: int
    end_ms: int
    count: int = 0
    first_ms: int = 2**62
    last_ms: int = -(2**62)

    def add(self, v: Any, ts: int) -> None:
        self.agg.add(v, ts)
        self.count += 1
        if ts < self.first_ms:
            self.first_ms = ts
        if ts > self.last_ms:
            self.last_ms = ts


@dataclass(slots=True)
class CellTotals:
    """One cell of a matrix meter in a period, per pricing version: live (every accepted
    event, for spend and the read model) and closed totals (rated), and closed events."""

    live: dict[str, Agg] = field(default_factory=dict)
    closed: dict[str, Agg] = field(default_factory=dict)
    closed_events: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class MeterPeriod:
    """Period-to-date state of one tenant meter, per pricing version: live totals (every
    accepted event, open and closed windows alike) for thresholds, closed totals for rating.
    Per version because each version's `included` and levels apply to the usage under it
    alone (SPEC §2.2): thresholds must measure what rating bills."""

    period: Period
    live: dict[str, Agg] = field(default_factory=dict)  # per pricing version
    closed: dict[str, Agg] = field(default_factory=dict)
    closed_events: dict[str, int] = field(default_factory=dict)  # per pricing version
    fired: set[tuple[str, str]] = field(default_factory=set)  # (pricing version, level)
    next_limit: Decimal = INF
    levels_of: str = ""  # pricing version that next_limit was computed for
    correction_seq: int = 0
    # For the read model (operators/usage.py), kept off the hot path: when each level was
    # crossed (event time), and the last event time of the windows closed so far.
    crossed: dict[tuple[str, str], int] = field(default_factory=dict)  # (pricing version, level) -> ms
    last_ms: int = -(2**62)
    # A matrix meter's cells (SPEC §9.1): `live` and `closed` above hold the meter's total
    # over all cells (thresholds measure it); each cell is rated on its own totals.
    cells: dict[tuple[str, ...], CellTotals] = field(default_factory=dict)

    def usage(self, pv: str) -> int | Decimal:
        """Period-to-date usage under pricing version `pv` (what its levels are measured on)."""
        agg = self.live.get(pv)
        return 0 if agg is None else agg.value()


@dataclass(slots=True)
class Slot:
    """Where a meter's (or a matrix meter's cell's) recent events went; consecutive events
    of a tenant mostly share it."""

    pv: str
    ws: int
    late: bool
    summed: bool  # SUM or COUNT without fees: updated inline on the hot path
    mp: MeterPeriod
    acc: WindowAcc
    live: Agg  # mp.live[pv], held here so the hot path needs no lookup for it
    cell_live: Agg | None = None  # a matrix cell's live total under pv


@dataclass(slots=True)
class Spend:
    """A tenant's running gross in one billing period, for plan spend thresholds (SPEC
    §9.4): the current charge of each (meter, pricing version, cell) and their sum."""

    charges: dict[tuple[str, str, tuple[str, ...] | None], Decimal] = field(default_factory=dict)
    gross: Decimal = Decimal(0)
    fired: set[str] = field(default_factory=set)  # levels fired (spend:<amount>)


# window key: (meter slug, period idx, pricing version, window start), and a matrix meter's
# cell as a fifth element (a plain meter's keys stay as they were, snapshots included)
WKey = tuple[Any, ...]


@dataclass(slots=True)
class TenantState:
    tenant_id: str
    dedup: GenerationalDedup
    watermark: int = -(2**62)
    closed_through: int = -(2**62)
    last_wall: float = 0.0
    periods: dict[tuple[str, int], MeterPeriod] = field(default_factory=dict)
    open: dict[WKey, WindowAcc] = field(default_factory=dict)
    pending: dict[WKey, WindowAcc] = field(default_factory=dict)
    sustained: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    next_due: int = -(2**62)  # watermark at which windows, periods or dedup need attention
    hot: dict[Any, Slot] = field(default_factory=dict)  # per meter (or matrix cell): the slot the last event used
    records: int = 0  # input records of the tenant that reached the engine, however judged (the read model's guard)
    spend: dict[str, Spend] = field(default_factory=dict)  # per billing period key, for plans with spend thresholds
    credits: Credits | None = None  # prepaid grants, once the tenant has one (operators/credits.py)
    gross: dict[str, Decimal] = field(default_factory=dict)  # a closing period's rated gross, for its minimum
    true_ups: dict[str, tuple[str, Decimal, int]] = field(default_factory=dict)  # period -> (version, amount, end ms), for the read model
    emitted: dict[str, Decimal] = field(default_factory=dict)  # per period: the gross of its lines so far (review's spike rule)
    held: dict[str, set[Any]] = field(default_factory=dict)  # per period: the windows whose line review held (their corrections wait too)


@dataclass(slots=True)
class Out:
    alerts: list[ThresholdAlert] = field(default_factory=list)
    lines: list[RatedUsageLine] = field(default_factory=list)
    # Per line: the period-to-date (quantity, amount, events) of its tenant, meter, period
    # and pricing version after it, so an emission register can settle replays by difference.
    totals: list[tuple[Decimal, Decimal, int, tuple[tuple[str, Decimal], ...]]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    credits: list[CreditRecord] = field(default_factory=list)  # granted, expired, voided (the ledger's grant-level records)
    # Meter periods forgotten past their grace: (tenant, (meter, period idx), final state).
    final: list[tuple[str, tuple[str, int], MeterPeriod]] = field(default_factory=list)
