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


_DAY_PREFIX: dict[int, str] = {}


def iso(ms: int) -> str:
    """RFC 3339 UTC with milliseconds; the date part is cached (every line carries four)."""
    day, rem = divmod(ms, DAY_MS)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        if len(_DAY_PREFIX) > 4096:
            _DAY_PREFIX.clear()
        prefix = _DAY_PREFIX[day] = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
    sec, milli = divmod(rem, 1000)
    h, sec = divmod(sec, 3600)
    m, sec = divmod(sec, 60)
    return f"{prefix}{h:02d}:{m:02d}:{sec:02d}.{milli:03d}Z"
