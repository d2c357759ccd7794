"""An independent, deliberately naive model of what the pipeline must produce.

It shares no code with `operators/`: plain json, its own price functions, a full
(non-windowed) dedup set. Tests compare the pipeline's Kafka outputs with it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any

D = Decimal


def _price(model: dict[str, Any], q: Decimal) -> Decimal:
    kind = model["model"]
    if q <= 0:
        return D(0)
    if kind == "per_unit":
        return q * D(str(model["unit_price"]))
    if kind == "package":
        n = (q / D(str(model["package_size"]))).to_integral_value(ROUND_CEILING)
        return n * D(str(model["package_price"]))
    tiers = model["tiers"]
    if kind == "volume":
        for t in tiers:
            if t["up_to"] is None or q <= D(str(t["up_to"])):
                return q * D(str(t["unit_price"])) + D(str(t.get("flat_fee", 0)))
    total, lower = D(0), D(0)
    for t in tiers:  # graduated
        upper = q if t["up_to"] is None else min(q, D(str(t["up_to"])))
        if upper > lower:
            total += (upper - lower) * D(str(t["unit_price"])) + D(str(t.get("flat_fee", 0)))
        if t["up_to"] is None or q <= D(str(t["up_to"])):
            break
        lower = D(str(t["up_to"]))
    return total


def charge(plan: dict[str, Any], meter: str, q: Decimal) -> Decimal:
    pm = plan["meters"][meter]
    unit = D(1).scaleb(-{"JPY": 0}.get(plan["currency"], 2))
    return _price(pm["price"], q - D(str(pm.get("included", 0)))).quantize(unit, ROUND_HALF_UP)


def _ts(s: str) -> datetime:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError("naive")
    return t.astimezone(UTC)


@dataclass
class Expected:
    accepted: int = 0
    duplicates: int = 0
    dead: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (tenant, meter, period) -> quantity, amount; per pricing version summed
    quantity: dict[tuple[str, str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    amount: dict[tuple[str, str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))


def expected(values: list[bytes], catalog: dict[str, Any], grace_s: float) -> Expected:
    """Process messages in order (each tenant's events sit in one partition, in order)."""
    plans = {p["id"]: p for p in catalog["plans"]}
    meters = defaultdict(list)
    for m in catalog["meters"]:
        meters[m["event_type"]].append(m)
    tenants = {t["tenant_id"]: t for t in catalog["tenants"]}
    seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    watermark: dict[str, datetime] = {}
    state: dict[tuple[str, str, str, str], Any] = {}  # (tenant, meter, period, plan) -> aggregate
    out = Expected()
    for raw in values:
        try:
            e = json.loads(raw, parse_float=Decimal)
        except ValueError:
            out.dead["invalid_json"] += 1
            continue
        try:
            assert e["specversion"] == "1.0" and all(isinstance(e[k], str) and e[k] for k in ("id", "source", "subject", "type"))
            t = _ts(e["time"])
        except (KeyError, AssertionError, ValueError, TypeError, AttributeError):
            out.dead["schema"] += 1
            continue
        if e["type"] not in meters:
            out.dead["unknown_meter"] += 1
            continue
        tenant = tenants.get(e["subject"])
        if tenant is None:
            out.dead["unknown_tenant"] += 1
            continue
        plan_id = tenant["plan"]
        for ch in sorted(tenant.get("plan_changes", []), key=lambda c: c["effective_from"]):
            if t >= _ts(ch["effective_from"]):
                plan_id = ch["plan"]
        plan = plans[plan_id]
        vals = []
        ok = True
        for m in meters[e["type"]]:
            if m["slug"] not in plan["meters"]:
                continue
            if m["aggregation"] == "COUNT":
                vals.append((m, 1))
                continue
            path = m.get("value_path") or m["unique_path"]
            v: Any = e.get("data")
            for p in path.split("."):
                v = v.get(p) if isinstance(v, dict) else None
            if m["aggregation"] == "UNIQUE_COUNT":
                ok = ok and isinstance(v, str | int) and not isinstance(v, bool)
            else:
                ok = ok and isinstance(v, int | Decimal) and not isinstance(v, bool) and v >= 0
            vals.append((m, v))
        if not ok:
            out.dead["bad_quantity"] += 1
            continue
        period = f"{t.year:04d}-{t.month:02d}"
        period_end = datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=UTC)
        wm = watermark.get(e["subject"])
        if wm is not None and (wm - period_end).total_seconds() >= grace_s:
            out.dead["too_late"] += 1
            continue
        key = (e["source"], e["id"])
        if key in seen[e["subject"]]:
            out.duplicates += 1
            continue
        seen[e["subject"]].add(key)
        out.accepted += 1
        watermark[e["subject"]] = max(wm, t) if wm else t
        for m, v in vals:
            k = (e["subject"], m["slug"], period, plan_id)
            agg = m["aggregation"]
            cur = state.get(k)
            if agg in ("SUM", "COUNT"):
                state[k] = (cur or 0) + v
            elif agg == "MAX":
                state[k] = max(cur or 0, v)
            elif agg == "UNIQUE_COUNT":
                state[k] = (cur or set()) | {v}
            else:  # LATEST: value of the greatest event time
                state[k] = max(cur or (t, v), (t, v), key=lambda x: x[0]) if cur else (t, v)
    for (tenant, slug, period, plan_id), agg in state.items():
        q = D(len(agg)) if isinstance(agg, set) else D(agg[1]) if isinstance(agg, tuple) else D(agg)
        out.quantity[(tenant, slug, period)] += q
        out.amount[(tenant, slug, period)] += charge(plans[plan_id], slug, q)
    return out
