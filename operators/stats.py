"""Conservation counters: every record ends as accepted, duplicate or dead letter."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal


@dataclass
class Stats:
    """Process-local counters (exported as metrics; not part of recovery state).

    A record is one event: a message holding a JSON array of N events is N records, a
    message that is not even JSON is one.
    """

    records_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    alerts: Counter[str] = field(default_factory=Counter)
    lines: int = 0
    corrections: int = 0
    amount: dict[str, Decimal] = field(default_factory=dict)
    open_windows: int = 0  # a gauge: windows holding usage not yet rated
    redis_up: bool = True  # a gauge: false while the dedup store or register waits for Redis
    resent_lines: int = 0  # pending lines of an earlier process produced again
    catalog_reloads: int = 0
    catalog_reload_errors: int = 0
    read_model_docs: int = 0  # documents written to the read model
    read_model_seconds: float = 0.0  # wall time spent building and writing them (its cost to throughput)
    input_delay_s: float = 0.0  # a gauge: how long the oldest record of the last batch waited (producer to intake)

    def conservation_gap(self) -> int:
        """records_in - (accepted + duplicates + dead letters); 0 when nothing is lost."""
        return self.records_in - self.accepted - self.duplicates - sum(self.dead.values())

    def add_amount(self, currency: str, amount: Decimal) -> None:
        self.amount[currency] = self.amount.get(currency, Decimal(0)) + amount
