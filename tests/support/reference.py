"""An independent, deliberately naive model of what the pipeline must produce.

It shares no code with `operators/`: plain json, its own price functions, a full
(non-windowed) dedup set, period totals recomputed from scratch. Tests compare the
pipeline's Kafka outputs with it.

Contracts (SPEC §9): AVG and MIN are the mean and the smallest of a period's unique values;
a matrix meter is one per-unit price per cell (its dimension values, "" when missing); a
percentage meter's amount is the rounded sum of its events' clamped fees; spend thresholds
fire once per tenant, period and amount when the period's running gross reaches them.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

D = Decimal
# ISO 4217 minor units where they are not 2 (written out again here, on purpose).
MINOR = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}
Cell = tuple[str, ...]  # a matrix meter's dimension values, in the meter's order


def _money(plan: dict[str, Any], x: Decimal) -> Decimal:
    return x.quantize(D(1).scaleb(-MINOR.get(plan["currency"], 2)), ROUND_HALF_UP)


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
    """The rounded price of a period quantity (not for matrix or percentage meters)."""
    pm = plan["meters"][meter]
    assert pm["price"]["model"] not in ("matrix", "percentage"), "see cell_charge and fee_charge"
    return _money(plan, _price(pm["price"], q - D(str(pm.get("included", 0)))))


def unit_price(plan: dict[str, Any], meter: str, dims: dict[str, str]) -> Decimal | None:
    """A matrix cell's unit price: the first rule all of whose `when` the values carry."""
    model = plan["meters"][meter]["price"]
    for rule in model.get("cells", []):
        if all(dims.get(k) == v for k, v in rule["when"].items()):
            return D(str(rule["unit_price"]))
    return None if model.get("default_unit_price") is None else D(str(model["default_unit_price"]))


def cell_charge(plan: dict[str, Any], meter: str, dims: dict[str, str], q: Decimal) -> Decimal:
    price = unit_price(plan, meter, dims)
    assert price is not None
    return _money(plan, q * price)


def event_fee(model: dict[str, Any], v: Decimal) -> Decimal:
    """One event's exact fee: value x rate + fixed_fee, clamped to [min_fee, max_fee]."""
    with localcontext() as ctx:
        ctx.prec = 200
        f = v * D(str(model["rate"])) + D(str(model.get("fixed_fee", 0)))
    if model.get("min_fee") is not None:
        f = max(f, D(str(model["min_fee"])))
    if model.get("max_fee") is not None:
        f = min(f, D(str(model["max_fee"])))
    return f


def fee_charge(plan: dict[str, Any], fees: list[Decimal]) -> Decimal:
    """A percentage meter's period amount: the rounded sum of its events' exact fees."""
    with localcontext() as ctx:
        ctx.prec = 200
        return _money(plan, sum(fees, D(0)))


def mean(total: Fraction, count: int) -> Decimal:
    """AVG: the mean to 9 decimal places, HALF_UP, by exact fractions."""
    if not count:
        return D(0)
    x = total / count * 10**9
    whole = int(x)
    return D(whole + (x - whole >= Fraction(1, 2))).scaleb(-9)


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
    # (tenant, meter, period) -> quantity, amount; per pricing version (and matrix cell) summed
    quantity: dict[tuple[str, str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    amount: dict[tuple[str, str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    # matrix meters only: (tenant, meter, period, cell values) -> quantity, amount; versions summed
    cell_quantity: dict[tuple[str, str, str, Cell], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    cell_amount: dict[tuple[str, str, str, Cell], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    # (tenant, period, level such as "spend:100.00") -> id of the event that crossed it
    spend_alerts: dict[tuple[str, str, str], str] = field(default_factory=dict)


def _read(data: Any, path: str) -> tuple[bool, Any]:
    """(found, value) at a dotted path of `data`."""
    v = data
    for p in path.split("."):
        if not isinstance(v, dict) or p not in v:
            return False, None
        v = v[p]
    return True, v


def _quantity(aggregation: str, st: Any) -> Decimal:
    if aggregation == "UNIQUE_COUNT":
        return D(len(st))
    if aggregation == "LATEST":
        return D(st[1])
    if aggregation == "AVG":
        return mean(*st)
    return D(st)  # SUM, COUNT, MAX, MIN


def _amount(plan: dict[str, Any], slug: str, cell: Cell | None, dims: list[str], q: Decimal, fees: list[Decimal]) -> Decimal:
    model = plan["meters"][slug]["price"]["model"]
    if model == "percentage":
        return fee_charge(plan, fees)
    if cell is not None:
        return cell_charge(plan, slug, dict(zip(dims, cell, strict=True)), q)
    return charge(plan, slug, q)


def expected(values: list[bytes], catalog: dict[str, Any], grace_s: float) -> Expected:
    """Process messages in order (each tenant's events sit in one partition, in order)."""
    plans = {p["id"]: p for p in catalog["plans"]}
    meters = defaultdict(list)
    for m in catalog["meters"]:
        meters[m["event_type"]].append(m)
    dims_of = {m["slug"]: list(m.get("dimensions") or []) for m in catalog["meters"]}
    aggregation = {m["slug"]: m["aggregation"] for m in catalog["meters"]}
    tenants = {t["tenant_id"]: t for t in catalog["tenants"]}
    seen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    watermark: dict[str, datetime] = {}
    # (tenant, meter, period, plan, cell or None) -> aggregate; percentage meters' fees beside
    state: dict[tuple[str, str, str, str, Cell | None], Any] = {}
    fees: dict[tuple[str, str, str, str, Cell | None], list[Decimal]] = defaultdict(list)
    cells: dict[tuple[str, str, str], set[Cell]] = defaultdict(set)  # across pricing versions
    gross: dict[tuple[str, str], dict[tuple[str, str, str, str, Cell | None], Decimal]] = defaultdict(dict)
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
        vals: list[tuple[dict[str, Any], Any, Cell | None]] = []
        ok = True
        unpriced = False
        for m in meters[e["type"]]:
            cell_values: list[str] = []
            for d in dims_of[m["slug"]]:  # read for every meter of the type: bad ones are bad input
                found, dv = _read(e.get("data"), d)
                ok = ok and (not found or (isinstance(dv, str) and len(dv) <= 64))
                cell_values.append(dv if found and isinstance(dv, str) else "")
            if m["slug"] not in plan["meters"]:
                continue
            matrix = plan["meters"][m["slug"]]["price"]["model"] == "matrix"
            cell = tuple(cell_values) if matrix else None
            if matrix and unit_price(plan, m["slug"], dict(zip(dims_of[m["slug"]], cell_values, strict=True))) is None:
                unpriced = True
            if m["aggregation"] == "COUNT":
                vals.append((m, 1, cell))
                continue
            path = m.get("value_path") or m["unique_path"]
            v: Any = e.get("data")
            for p in path.split("."):
                v = v.get(p) if isinstance(v, dict) else None
            if m["aggregation"] == "UNIQUE_COUNT":
                ok = ok and isinstance(v, str | int) and not isinstance(v, bool)
            else:
                if isinstance(v, str) and re.fullmatch(r"\d+(\.\d+)?", v):
                    v = Decimal(v)  # a decimal string (money, exact)
                ok = ok and isinstance(v, int | Decimal) and not isinstance(v, bool) and v >= 0
            vals.append((m, v, cell))
        if not ok:
            out.dead["bad_quantity"] += 1
            continue
        if unpriced:
            out.dead["unpriced_dimension"] += 1
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
        if any(
            c is not None
            and c not in cells[(e["subject"], m["slug"], period)]
            and len(cells[(e["subject"], m["slug"], period)]) >= int(plan["meters"][m["slug"]]["price"].get("max_cells", 1000))
            for m, _, c in vals
        ):
            out.dead["too_many_cells"] += 1
            continue
        seen[e["subject"]].add(key)
        out.accepted += 1
        watermark[e["subject"]] = max(wm, t) if wm else t
        running = gross[(e["subject"], period)]
        for m, v, c in vals:
            k = (e["subject"], m["slug"], period, plan_id, c)
            agg = m["aggregation"]
            cur = state.get(k)
            if c is not None:
                cells[(e["subject"], m["slug"], period)].add(c)
            if agg in ("SUM", "COUNT"):
                state[k] = (cur or 0) + v
            elif agg == "MAX":
                state[k] = max(cur or 0, v)
            elif agg == "MIN":
                state[k] = v if cur is None else min(cur, v)
            elif agg == "AVG":
                state[k] = (cur[0] + Fraction(v), cur[1] + 1) if cur else (Fraction(v), 1)
            elif agg == "UNIQUE_COUNT":
                state[k] = (cur or set()) | {v}
            else:  # LATEST: value of the greatest event time
                state[k] = max(cur or (t, v), (t, v), key=lambda x: x[0]) if cur else (t, v)
            if plan["meters"][m["slug"]]["price"]["model"] == "percentage":
                fees[k].append(event_fee(plan["meters"][m["slug"]]["price"], D(v)))
            running[k] = _amount(plan, m["slug"], c, dims_of[m["slug"]], _quantity(agg, state[k]), fees[k])
        spent = sum(running.values(), D(0))
        for th in plan.get("spend_thresholds", []):
            level = (e["subject"], period, f"spend:{D(str(th['amount']))}")
            if spent >= D(str(th["amount"])) and level not in out.spend_alerts:
                out.spend_alerts[level] = e["id"]
    for (tenant_id, slug, period, plan_id, c), agg in state.items():
        q = _quantity(aggregation[slug], agg)
        amount = _amount(plans[plan_id], slug, c, dims_of[slug], q, fees[(tenant_id, slug, period, plan_id, c)])
        out.quantity[(tenant_id, slug, period)] += q
        out.amount[(tenant_id, slug, period)] += amount
        if c is not None:
            out.cell_quantity[(tenant_id, slug, period, c)] += q
            out.cell_amount[(tenant_id, slug, period, c)] += amount
    # Minimum commitments (SPEC §9.6): a period closed for late events (the tenant's last
    # event time is past its end and grace) billed below the minimum of the plan in force at
    # its end gets one true-up of the difference, under the meter "minimum".
    gross: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for (tenant_id, _, period), amount in list(out.amount.items()):
        gross[(tenant_id, period)] += amount
    for (tenant_id, period), g in gross.items():
        year, month = int(period[:4]), int(period[5:7])
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        wm = watermark.get(tenant_id)
        if wm is None or (wm - end).total_seconds() < grace_s:
            continue
        tenant = tenants[tenant_id]
        plan_id = tenant["plan"]
        for ch in sorted(tenant.get("plan_changes", []), key=lambda c: c["effective_from"]):
            if end - timedelta(milliseconds=1) >= _ts(ch["effective_from"]):
                plan_id = ch["plan"]
        minimum = plans[plan_id].get("minimum")
        if minimum and g < D(str(minimum["amount"])):
            out.quantity[(tenant_id, "minimum", period)] += 1
            out.amount[(tenant_id, "minimum", period)] += D(str(minimum["amount"])) - g
    return out
