"""The operations tools' arguments checked against the catalog before anything is read or
sent: a typo in a period, tenant, customer, reason or destination is one line naming the
option and the fix (exit code 2), never a run that quietly finds nothing ("replayed 0
events").

Each tool's `check(args)` runs before the brokers are asked (tallyflow/cli.py), so a typo is
reported at once, with or without a reachable cluster.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from operators.catalog_index import CatalogIndex, PlanIndex
from operators.periods import Period, period_of
from runtime.settings import Settings
from schemas.catalog import load_catalog
from schemas.errors import TallyflowError

_SHAPES = {"month": (re.compile(r"\d{4}-\d{2}"), "%Y-%m", "YYYY-MM"), "day": (re.compile(r"\d{4}-\d{2}-\d{2}"), "%Y-%m-%d", "YYYY-MM-DD")}
_ADVERB = {"month": "monthly", "day": "daily"}


class ArgumentError(TallyflowError):
    """An option's value that cannot be what the person meant; the message names the option and the fix."""


def catalog(s: Settings) -> CatalogIndex:
    return CatalogIndex.build(load_catalog(s.process.catalog))


def hint(value: str, known: Iterable[str], cutoff: float = 0.75) -> str:
    names = list(known)
    close = [k for k in names if k.lower() == value.lower()] or difflib.get_close_matches(value, names, n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def _kind(value: str) -> tuple[str, Period] | None:
    """(kind, period) of a well-formed billing period key, else None."""
    for kind, (pattern, fmt, _) in _SHAPES.items():
        if pattern.fullmatch(value):
            try:
                start = datetime.strptime(value, fmt).replace(tzinfo=UTC)
            except ValueError:
                return None
            return kind, period_of(int(start.timestamp() * 1000), kind)
    return None


def tenants(cat: CatalogIndex, values: Iterable[str], option: str = "--tenant") -> list[str]:
    """Every value is a tenant of the catalog."""
    out = list(values)
    for t in out:
        if t not in cat.tenants:
            raise ArgumentError(f"{option} '{t}': no such tenant in the catalog{hint(t, cat.tenants)}")
    return out


def periods(
    cat: CatalogIndex,
    values: Iterable[str],
    *,
    tenant_ids: Iterable[str] = (),
    option: str = "--period",
    max_future_seconds: float = 300.0,
    now_ms: int | None = None,
) -> list[str]:
    """Every value is a billing period some plan bills by (of `tenant_ids`' plans when given,
    else of any plan in the catalog), and it has begun."""
    chosen = list(tenant_ids)
    plans: list[PlanIndex] = [p for t in chosen for p in cat.tenants[t].plans] if chosen else list(cat.plans_by_version.values())
    kinds = sorted({p.billing_period for p in plans}, key=list(_SHAPES).index)
    shapes = " or ".join(f"{_SHAPES[k][2]} ({_ADVERB[k]} plans)" if len(kinds) > 1 else _SHAPES[k][2] for k in kinds) or "YYYY-MM"
    whose = f"the plans of {', '.join(chosen)}" if chosen else "the catalog's plans"
    now = int(time.time() * 1000) if now_ms is None else now_ms
    out = list(values)
    for v in out:
        found = _kind(v)
        if found is None:
            raise ArgumentError(
                f"{option} '{v}': not a billing period; write {shapes}, e.g. {period_of(now, kinds[0] if kinds else 'month').key}"
            )
        kind, p = found
        if kind not in kinds:
            raise ArgumentError(f"{option} '{v}': {whose} bill by {' and '.join(kinds) or 'no period'}, not by {kind}; write {shapes}")
        if p.start_ms > now + max_future_seconds * 1000:
            raise ArgumentError(f"{option} '{v}': that period has not begun; the current one is {period_of(now, kind).key}")
    return out


def customers(cat: CatalogIndex, values: Iterable[str], option: str = "--customer") -> list[str]:
    """Every value is an erp_customer_id of a tenant in the catalog."""
    known = {ti.tenant.erp_customer_id for ti in cat.tenants.values()}
    out = list(values)
    for c in out:
        if c not in known:
            raise ArgumentError(f"{option} '{c}': no tenant in the catalog has that erp_customer_id{hint(c, known)}")
    return out


def one_of(values: Iterable[str], allowed: Iterable[str], option: str) -> list[str]:
    """Every value is one of `allowed` (a closed list: reasons, destinations)."""
    known = list(allowed)
    out = list(values)
    for v in out:
        if v not in known:
            raise ArgumentError(f"{option} '{v}': not one of {', '.join(known)}{hint(v, known, 0.6)}")
    return out
