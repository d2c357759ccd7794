"""Billing periods (calendar month or day, UTC) and event-time formatting."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Period:
    kind: str
    idx: int  # consecutive periods have consecutive idx (for sustained rules)
    key: str  # "2026-11" or "2026-11-05"
    start_ms: int
    end_ms: int


def _ms(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def period_of(ts_ms: int, kind: str) -> Period:
    if kind == "day":
        d = ts_ms // DAY_MS
        day = _EPOCH + timedelta(days=d)
        return Period(kind, d, day.strftime("%Y-%m-%d"), d * DAY_MS, (d + 1) * DAY_MS)
    dt = _EPOCH + timedelta(milliseconds=ts_ms)
    start = datetime(dt.year, dt.month, 1, tzinfo=UTC)
    end = datetime(dt.year + dt.month // 12, dt.month % 12 + 1, 1, tzinfo=UTC)
    return Period(kind, dt.year * 12 + dt.month - 1, f"{dt.year:04d}-{dt.month:02d}", _ms(start), _ms(end))


class PeriodCache:
    """Remembers the last period per kind: consecutive events nearly always share it."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, Period] = {}

    def get(self, ts_ms: int, kind: str) -> Period:
        p = self._last.get(kind)
        if p is None or not (p.start_ms <= ts_ms < p.end_ms):
            p = self._last[kind] = period_of(ts_ms, kind)
        return p


def iso(ms: int) -> str:
    """RFC 3339 UTC with milliseconds."""
    return (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
