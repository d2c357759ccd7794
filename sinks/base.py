"""One protocol for every destination: deliver a batch, answer what became of each item.

An adapter makes one attempt and says, per item, accepted (the destination has it, now or
from before) or rejected for good (with why: it goes to the exceptions topic), or that
nothing was decided and the whole batch must be tried again later (a timeout, 5xx, 429,
the destination down). Rate limits, retries with Retry-After, the circuit breaker, the
delivery ledger and the exceptions topic are the courier's (`sinks.courier`), shared by
every adapter; an adapter is only the translation to one remote API.

To add a destination (say NetSuite's REST API with its idempotency header): a class with
`name`, `send(key, items) -> Answer` and `close()`; `key` is stable for the same items
(a batch's or an alert's idempotency key), so a re-send after a crash is recognisable.
Alerts are sent from several threads at once: `send` must be thread-safe, or the class sets
`max_in_flight = 1` (the courier then sends one request at a time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

T_contra = TypeVar("T_contra", contravariant=True)


@dataclass(frozen=True)
class Answer:
    """A destination's answer to one attempt at a batch."""

    retry: bool = False  # nothing was decided: try the whole batch again later
    rejected: Mapping[int, str] = field(default_factory=dict)  # position in the batch -> why, for good
    retry_after: float | None = None  # seconds the destination asked to wait (Retry-After)
    status: int | str | None = None  # for logs and metrics: an HTTP status, "timeout", ...
    detail: str = ""  # the response, cut, for a person reading the exceptions topic

    @classmethod
    def later(cls, status: int | str | None, detail: str = "", retry_after: float | None = None) -> Answer:
        return cls(retry=True, status=status, detail=detail, retry_after=retry_after)

    @classmethod
    def all_rejected(cls, n: int, why: str, status: int | str | None = None) -> Answer:
        return cls(rejected=dict.fromkeys(range(n), why), status=status, detail=why)


class Destination(Protocol[T_contra]):
    name: str

    def send(self, key: str, items: Sequence[T_contra]) -> Answer:
        """One attempt, no retries of its own; must not raise for a remote's failure."""
        ...

    def close(self) -> None: ...
