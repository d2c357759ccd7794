"""`GET /tenants/{tenant}?period=&tz=`: one tenant's usage for people, as a small HTML page
(no script: the charts are inline SVG drawn here).

Per meter: a bar of the usage under the plan in force, scaled to what is included or, past it,
to what is used (the overage in another colour), a tick at each threshold level and at the
hard limit within that scale, and the ones beyond it pinned at the bar's right edge and
named under it; the figures; the amount to date, with what of it is rated already and what
is not yet; a matrix meter's cells; and the usage per day of the period as a bar chart (when
the read model carries a daily series). Then the plan's spend alerts, and the levels crossed
in the period, newest first. Times are shown in the viewer's UTC offset (`?tz=+01:00`,
default UTC), labelled; money always with its currency's minor unit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from html import escape
from typing import Any
from urllib.parse import urlencode

from operators.catalog_index import CatalogIndex, PlanIndex
from operators.thresholds import SPEND_METER
from operators.usage import plan_in_force
from schemas.catalog import quantum
from schemas.usage import CellUsage, GrantBalance, LevelCrossed, MeterUsage, TenantUsage

# A meter's usage per UTC day of the period, oldest first: ("2026-12-02", quantity). Days
# without usage may be left out (they are drawn as zero up to the tenant's watermark).
DailySeries = Sequence[tuple[str, Decimal]]

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:56rem;color:#1d2330;padding:0 1rem}
h1{font-size:1.4rem;margin:0}.sub{color:#5b6473;margin:.2rem 0 .4rem}.tz{color:#5b6473;margin:0 0 1rem;font-size:.9rem}
nav a{margin-right:.6rem}nav a.on{font-weight:600;text-decoration:none;color:#1d2330}
.meter{border:1px solid #dde2ea;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
.meter h2{font-size:1.05rem;margin:0 0 .4rem;display:flex;justify-content:space-between}
.bar{position:relative;height:22px;background:#eef1f5;border-radius:4px;overflow:hidden}
.in{position:absolute;left:0;top:0;bottom:0;background:#3b82c4}
.over{position:absolute;top:0;bottom:0;background:#e08a2e}
.tick{position:absolute;top:0;bottom:0;width:2px;background:#1d2330;opacity:.55}
.tick.hard{background:#c62828;opacity:1;width:3px}
.tick.far{width:4px;opacity:1;background:repeating-linear-gradient(#1d2330 0 3px,transparent 3px 6px)}
.tick.hard.far{background:repeating-linear-gradient(#c62828 0 3px,transparent 3px 6px)}
.ends{display:flex;justify-content:space-between;font-size:.8rem;color:#5b6473}
.beyond{font-size:.85rem;color:#39414f;margin:.1rem 0 0}
.figs{display:flex;flex-wrap:wrap;gap:.3rem 1.4rem;margin-top:.5rem;color:#39414f}
.figs b{color:#1d2330}.closed{color:#c62828;font-weight:600}
.money{margin:.5rem 0 0;color:#39414f}.money b{color:#1d2330}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eef1f5}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cells{margin-top:.6rem;font-size:.9rem}.cells caption{text-align:left;font-weight:600;padding:.2rem .5rem}
.chart{margin-top:.6rem}.chart svg{display:block;width:100%;height:auto}.chart p,.nodaily{font-size:.85rem;color:#5b6473;margin:.2rem 0 0}
.spend{border:1px solid #dde2ea;border-radius:8px;padding:.6rem 1rem;margin:.8rem 0}.spend h2{font-size:1.05rem;margin:0 0 .3rem}
.spend ul{margin:.2rem 0;padding-left:1.2rem}
.legend span{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin:0 .3rem 0 .8rem;vertical-align:-1px}
"""

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# How one day's figure is made from the day's events, by the meter's aggregation.
_PER_DAY = {
    "SUM": "the day's total",
    "COUNT": "events that day",
    "MAX": "the day's highest value",
    "MIN": "the day's lowest value",
    "AVG": "the day's average",
    "LATEST": "the last value of the day",
    "UNIQUE_COUNT": "distinct that day",
}
_OFFSET = re.compile(r"(?:UTC|GMT)?([+\- \u2212]?)(\d{1,2})(?::?(\d{2}))?", re.IGNORECASE)
CELL_ROWS = 25  # a matrix meter's cells shown on the page (the API lists all)


@dataclass(frozen=True, slots=True)
class Zone:
    """The viewer's UTC offset: how times are shown and labelled."""

    tz: timezone
    label: str  # "UTC", "UTC+01:00"
    param: str | None  # as it goes back into links (None: UTC, the default)
    problem: str | None = None  # `?tz=` could not be read (times are then in UTC)


def zone(tz: str | None) -> Zone:
    """`?tz=` read leniently: `+01:00`, `-05:30`, `+0530`, `+1`, `UTC+2`, `Z`, `UTC`. An
    unescaped `+` arrives as a space from a query string, and is read as `+`."""
    text = (tz or "").rstrip()
    if text.strip().upper() in ("", "Z", "UTC", "GMT"):
        return Zone(UTC, "UTC", None)
    m = _OFFSET.fullmatch(text)
    minutes = None
    if m is not None:
        h, mm = int(m.group(2)), int(m.group(3) or 0)
        if mm < 60 and h * 60 + mm <= 14 * 60:
            minutes = (-1 if m.group(1) in "-\u2212" else 1) * (h * 60 + mm)
    if minutes is None:
        why = f"'{tz}' is not a UTC offset; write one such as ?tz=%2B01:00 or ?tz=-05:30. Times are in UTC"
        return Zone(UTC, "UTC", None, why)
    if minutes == 0:
        return Zone(UTC, "UTC", None)
    sign = "+" if minutes > 0 else "-"
    h, mm = divmod(abs(minutes), 60)
    offset = f"{sign}{h:02d}:{mm:02d}"
    return Zone(timezone(timedelta(minutes=minutes)), f"UTC{offset}", offset)


def _parse(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)


def _when(iso: str | None, z: Zone, year: int, *, label: bool = True, none: str = "—") -> str:
    """An RFC 3339 time as people read it, in the viewer's offset: `2 Dec 16:37 UTC` (the
    year only when it is not the page's); the exact time stays in the element."""
    if not iso:
        return escape(none)
    d = _parse(iso).astimezone(z.tz)
    yr = f" {d.year}" if d.year != year else ""
    text = f"{d.day} {_MONTHS[d.month - 1]}{yr} {d:%H:%M}" + (f" {z.label}" if label else "")
    return f'<time datetime="{escape(iso)}">{text}</time>'


def _n(v: Decimal | None) -> str:
    """A quantity as people read it: thousands separated, no exponent."""
    if v is None:
        return "—"
    q = v.normalize()
    return f"{q:,f}" if q == q.to_integral_value() else f"{v:,f}"


def _money(currency: str, v: Decimal) -> str:
    """An amount with its currency and at least its minor unit (`USD 120.00`, `JPY 500`), and
    any finer digits it has (never rounded for show)."""
    q = quantum(currency)
    shown = v.quantize(q) if v == v.quantize(q) else v
    return f"{escape(currency)} {shown:,f}"


def _pct(v: Decimal, scale: Decimal) -> Decimal:
    return min(max(v / scale * 100, Decimal(0)), Decimal(100))


def _bar(m: MeterUsage, marks: list[tuple[str, Decimal]]) -> str:
    """The bar: full width is what is included, or what is used once past it; a threshold or
    hard limit beyond that is pinned at the right edge (dashed) and named under the bar."""
    scale = max(m.included, m.used)
    inside, over = min(m.used, m.included), max(m.used - m.included, Decimal(0))
    all_marks = [(name, limit, "tick") for name, limit in marks]
    if m.hard_limit is not None:
        all_marks.append(("hard limit", m.hard_limit, "tick hard"))
    all_marks.sort(key=lambda mk: mk[1])
    ticks: list[str] = []
    beyond: list[str] = []
    for name, limit, cls in all_marks:
        if scale > 0 and limit <= scale:
            left = f"calc({_pct(limit, scale):.2f}% - {3 if 'hard' in cls else 2}px)" if limit > 0 else "0"
            ticks.append(f'<div class="{cls}" style="left:{left}" title="{escape(name)}: {_n(limit)}"></div>')
        else:
            times = f", {limit / scale:.1f}× the bar" if scale > 0 else ""
            right = 6 * len(beyond)  # side by side at the edge, nearest first
            title = f"{escape(name)}: {_n(limit)} (beyond the bar{times})"
            ticks.append(f'<div class="{cls} far" style="right:{right}px" title="{title}"></div>')
            beyond.append(f"{escape(name)} at {_n(limit)}")
    if scale > 0:
        fill = f'<div class="in" style="width:{_pct(inside, scale):.2f}%"></div>'
        fill += f'<div class="over" style="left:{_pct(inside, scale):.2f}%;width:{_pct(over, scale):.2f}%"></div>'
        end = f"{_n(scale)} {'used' if m.used > m.included else 'included'}"
        if m.included == 0:
            end += " (nothing included: all of it is billed)"
    else:
        fill, end = "", "nothing included, nothing used"
    label = f"{m.meter}: {_n(m.used)} used of {_n(m.included)} included"
    far = f'<p class="beyond">Beyond the bar (marked at its right edge): {" · ".join(beyond)}</p>' if beyond else ""
    return (
        f'<div class="bar" role="img" aria-label="{escape(label)}">{fill}{"".join(ticks)}</div>\n'
        f'  <div class="ends"><span>0</span><span class="end">{end}</span></div>{far}'
    )


def _money_line(m: MeterUsage) -> str:
    """The amount to date in words: what of it is rated (on its way to the invoice), what not yet."""
    cur = m.currency
    pending = m.amount - m.amount_rated
    if m.amount == 0 and m.amount_rated == 0:
        why = "within what the plan includes" if m.used <= m.included and m.used > 0 else "nothing to pay"
        return f'<p class="money">Amount to date <b>{_money(cur, m.amount)}</b>: {why} so far.</p>'
    if pending == 0:
        return (
            f'<p class="money">Amount to date <b>{_money(cur, m.amount)}</b>, all of it rated '
            f'(<b class="rated">{_money(cur, m.amount_rated)}</b> on rated lines, on their way to the invoice).</p>'
        )
    what = "not rated yet" if pending > 0 else "a correction not rated yet"
    return (
        f'<p class="money">Amount to date <b>{_money(cur, m.amount)}</b>: rated so far <b class="rated">{_money(cur, m.amount_rated)}</b> '
        f'(on rated lines, on their way to the invoice); <b class="pending">{_money(cur, pending)}</b> {what} '
        "(recent usage whose time window is still open; it is rated when the window closes).</p>"
    )


def _cells(m: MeterUsage, dims: Sequence[str]) -> str:
    """A matrix meter's cells: dimension values, quantity and amount, largest amounts first."""
    if not m.cells:
        return ""
    names = list(dims) or list(dict.fromkeys(k for c in m.cells for k in c.dimensions))
    versions = len({c.pricing_version for c in m.cells}) > 1

    def key(c: CellUsage) -> tuple[Decimal, Decimal, tuple[str, ...]]:
        return (-c.amount, -c.quantity, tuple(c.dimensions.get(n, "") for n in names))

    cells = sorted(m.cells, key=key)
    head = "".join(f"<th>{escape(n)}</th>" for n in names) + ("<th>plan</th>" if versions else "")
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{escape(c.dimensions.get(n, '')) or '(none)'}</td>" for n in names)
        + (f"<td>{escape(c.pricing_version)}</td>" if versions else "")
        + f'<td class="num">{_n(c.quantity)}</td><td class="num">{_money(m.currency, c.amount)}</td></tr>'
        for c in cells[:CELL_ROWS]
    )
    more = len(cells) - CELL_ROWS
    foot = (
        f'<tr><td colspan="{len(names) + versions + 2}">… {more} more cell(s); the usage API lists every one</td></tr>' if more > 0 else ""
    )
    return (
        f'\n  <table class="cells" id="cells-{escape(m.meter)}"><caption>By {escape(", ".join(names))}</caption>'
        f'<tr>{head}<th class="num">quantity</th><th class="num">amount</th></tr>{rows}{foot}</table>'
    )


def _days(doc: TenantUsage) -> list[date]:
    start, end = _parse(doc.period_start).date(), _parse(doc.period_end).date()
    return [start + timedelta(days=i) for i in range((end - start).days)]


def chart(doc: TenantUsage, m: MeterUsage, series: DailySeries | None, aggregation: str | None) -> str:
    """The meter's usage per UTC day of the period as an SVG bar chart (no script). Days up to
    the tenant's watermark without usage are zero; later days are left empty."""
    slug = escape(m.meter)
    if series is None:
        return f'\n  <p class="nodaily" id="daily-{slug}">Daily usage: no daily series yet.</p>'
    days = _days(doc)
    if len(days) <= 1:
        return f'\n  <p class="nodaily" id="daily-{slug}">Daily usage: this billing period is one day.</p>'
    by_day: dict[str, Decimal] = {}
    for day, q in series:
        by_day[day] = by_day.get(day, Decimal(0)) + q
    last = _parse(doc.watermark).date() if doc.watermark else None
    W, H, left, right, top, bottom = 640, 150, 52, 8, 12, 22
    plot_w, plot_h = W - left - right, H - top - bottom
    top_q = max(by_day.values(), default=Decimal(0))
    scale = top_q if top_q > 0 else Decimal(1)
    step = plot_w / len(days)
    gap = 1 if step < 8 else 2
    parts = [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{W - right}" y2="{top + plot_h}" stroke="#9aa3b2" stroke-width="1"/>',
        f'<line class="grid" x1="{left}" y1="{top}" x2="{W - right}" y2="{top}" stroke="#dde2ea" stroke-width="1"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="11" fill="#5b6473">{_n(top_q)}</text>',
        f'<text x="{left - 6}" y="{top + plot_h + 4}" text-anchor="end" font-size="11" fill="#5b6473">0</text>',
    ]
    peak: tuple[Decimal, date] | None = None
    for i, d in enumerate(days):
        x = left + i * step
        key = d.isoformat()
        if (last is not None and d <= last) or key in by_day:
            q = by_day.get(key, Decimal(0))
            if peak is None or q > peak[0]:
                peak = (q, d)
            h = max(float(q / scale), 0.0) * plot_h  # a signed meter's negative day draws as none
            parts.append(
                f'<rect class="day" data-day="{key}" data-quantity="{q}" x="{x + gap / 2:.2f}" y="{top + plot_h - h:.2f}" '
                f'width="{step - gap:.2f}" height="{h:.2f}" fill="#3b82c4"><title>{d.day} {_MONTHS[d.month - 1]}: {_n(q)}</title></rect>'
            )
        if d.day == 1 or d.day % 5 == 0 or i == len(days) - 1:
            parts.append(f'<text x="{x + step / 2:.2f}" y="{H - 6}" text-anchor="middle" font-size="10" fill="#5b6473">{d.day}</text>')
    month = f"{_MONTHS[days[0].month - 1]} {days[0].year}"
    peak_text = f"; peak {_n(peak[0])} on {peak[1].day} {_MONTHS[peak[1].month - 1]}" if peak is not None and peak[0] > 0 else ""
    title = f"{m.meter} per day, {month}{peak_text}"
    per_day = _PER_DAY.get(aggregation or "", "per day")
    return (
        f'\n  <figure class="chart" id="daily-{slug}" style="margin:0">'
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(parts)}</svg>"
        f"<p>Usage per day ({escape(per_day)}), days in UTC.</p></figure>"
    )


def _meter(
    m: MeterUsage,
    marks: list[tuple[str, Decimal]],
    z: Zone,
    year: int,
    doc: TenantUsage,
    series: DailySeries | None,
    aggregation: str | None,
    dims: Sequence[str],
) -> str:
    access = "" if m.has_access else ' <span class="closed">access closed: hard limit reached</span>'
    soft = "none (soft: usage past included is billed)"
    return f"""
<section class="meter" id="meter-{escape(m.meter)}">
  <h2><span>{escape(m.meter)}{access}</span><span class="amount">{_money(m.currency, m.amount)}</span></h2>
  {_bar(m, marks)}
  <div class="figs">
    <span>used <b class="used">{_n(m.used)}</b> of <b class="included">{_n(m.included)}</b> included</span>
    <span>remaining <b class="remaining">{_n(m.remaining)}</b></span>
    <span>overage <b class="overage">{_n(m.overage)}</b></span>
    <span>hard limit <b>{_n(m.hard_limit) if m.hard_limit is not None else soft}</b></span>
    <span>plan <b>{escape(m.pricing_version)}</b></span>
    <span>last event <b>{_when(m.last_event_time, z, year)}</b></span>
  </div>
  {_money_line(m)}{_cells(m, dims)}{chart(doc, m, series, aggregation)}
</section>"""


def _spend(plan: PlanIndex | None, spend: list[tuple[str, LevelCrossed]], totals: dict[str, Decimal], z: Zone, year: int) -> str:
    """The plan's spend alerts (on the period's amount over all meters) and the ones crossed."""
    if not spend and (plan is None or not plan.spend):
        return ""
    crossed = {lv.level: lv for _, lv in spend}
    items = []
    cur = plan.plan.currency if plan is not None else ""
    so_far = totals.get(cur, Decimal(0))
    for st in plan.spend if plan is not None else []:
        lv = crossed.pop(st.level, None)
        if lv is not None:
            state = f"crossed {_when(lv.crossed_at, z, year, none='before the read model')}"
        elif so_far >= st.amount:
            state = "reached by the amount to date"
        else:
            state = f"{_money(cur, st.amount - so_far)} to go"
        items.append(f'<li data-level="{escape(st.level)}">{_money(cur, st.amount)}: {state}</li>')
    for name, lv in crossed.items():  # crossed under an earlier plan of the period
        amount = _money(cur, lv.limit) if cur else _n(lv.limit)
        items.append(
            f'<li data-level="{escape(name)}">{amount} ({escape(lv.pricing_version)}): crossed '
            f"{_when(lv.crossed_at, z, year, none='before the read model')}</li>"
        )
    total = _money(cur, so_far) if cur else "—"
    return f"""
<section class="spend" id="spend"><h2>Spend alerts</h2>
<p>An alert goes out when the period's amount over all meters reaches one of these. Amount to date <b>{total}</b>.</p>
<ul>{"".join(items)}</ul></section>"""


def _daily_of(m: MeterUsage) -> DailySeries | None:
    """The read model's own series once `MeterUsage.daily` exists (a list of `DayUsage(day,
    quantity)`); until then None and the page says so."""
    days: Any = getattr(m, "daily", None)
    if days is None:
        return None
    return [(str(d.day), Decimal(d.quantity)) for d in days]


def render(
    doc: TenantUsage,
    cat: CatalogIndex,
    periods: list[str],
    *,
    tz: str | None = None,
    daily: Mapping[str, DailySeries] | None = None,
) -> str:
    """The page; every value from the read model or the catalog is escaped. `tz` is the
    `?tz=` query parameter (the viewer's UTC offset); `daily` a per-day series per meter, where
    the read model does not carry one itself."""
    z = zone(tz)
    year = _parse(doc.as_of).astimezone(z.tz).year
    aggregation = {mt.slug: mt.aggregation for mt in cat.catalog.meters}
    meters = []
    for slug in sorted(doc.meters):
        if slug == SPEND_METER:
            continue
        m = doc.meters[slug]
        plan = cat.plans_by_version.get(m.pricing_version)
        pmi = plan.meters.get(slug) if plan else None
        marks = [(lv.name, lv.limit) for lv in pmi.levels] if pmi else []
        dims = pmi.dimensions if pmi else ()
        series = daily.get(slug) if daily is not None else _daily_of(m)
        meters.append(_meter(m, marks, z, year, doc, series, aggregation.get(slug), dims))
    levels = [(lv.crossed_at or "", slug, lv) for slug, m in doc.meters.items() for lv in m.levels]
    crossed = sorted(levels, key=lambda x: x[0], reverse=True)
    currency = {slug: m.currency for slug, m in doc.meters.items()}

    def limit(slug: str, lv: LevelCrossed) -> str:
        return _money(currency[slug], lv.limit) if lv.level.startswith("spend:") else _n(lv.limit)

    rows = "".join(
        f"<tr><td>{_when(lv.crossed_at, z, year, none='before the read model')}</td>"
        f"<td>{'all meters (spend)' if slug == SPEND_METER or lv.level.startswith('spend:') else escape(slug)}</td>"
        f"<td>{escape(lv.level)}</td><td>{limit(slug, lv)}</td><td>{escape(lv.pricing_version)}</td></tr>"
        for _, slug, lv in crossed[:20]
    )
    alerts = (
        f'<table id="crossed"><tr><th>crossed at</th><th>meter</th><th>level</th><th>limit</th><th>plan</th></tr>{rows}</table>'
        if rows
        else "<p>No threshold crossed in this period.</p>"
    )
    tid = escape(doc.tenant_id)

    def href(period: str) -> str:
        return escape("?" + urlencode({"period": period, **({"tz": z.param} if z.param else {})}))

    nav = " ".join(f'<a href="{href(p)}"{" class=on" if p == doc.period else ""}>{escape(p)}</a>' for p in periods)
    totals: dict[str, Decimal] = {}
    for m in doc.meters.values():
        if m.meter != SPEND_METER:
            totals[m.currency] = totals.get(m.currency, Decimal(0)) + m.amount
    total = ", ".join(_money(c, v) for c, v in sorted(totals.items())) or "nothing"
    in_force = plan_in_force(cat, doc.tenant_id, max(_ms(doc.period_start), min(_ms(doc.watermark or doc.as_of), _ms(doc.period_end) - 1)))
    spend = [(slug, lv) for slug, m in doc.meters.items() for lv in m.levels if lv.level.startswith("spend:")]
    note = f' <span class="problem">({escape(z.problem)}.)</span>' if z.problem else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Usage of {tid} · {escape(doc.period)} · Tallyflow</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>Usage of <span id="tenant">{tid}</span> in <span id="period">{escape(doc.period)}</span></h1>
<p class="sub">Amount to date <b id="total">{total}</b> · {doc.events:,} events ·
period from {_when(doc.period_start, z, year, label=False)} to {_when(doc.period_end, z, year)} ·
as of {_when(doc.as_of, z, year)} · events up to {_when(doc.watermark, z, year, none="none yet")}</p>
<p class="tz">Times in <b id="tz">{z.label}</b>{note} · for another UTC offset add it to the address: <code>?tz=-05:00</code></p>
<nav>{nav}</nav>
<p class="legend"><span style="background:#3b82c4"></span>within included<span style="background:#e08a2e"></span>overage
<span style="background:#1d2330;opacity:.55;width:3px"></span>threshold<span style="background:#c62828;width:3px"></span>hard limit
<span style="background:repeating-linear-gradient(#1d2330 0 3px,transparent 3px 6px);width:4px"></span>threshold beyond the bar</p>
{_spend(in_force, spend, totals, z, year)}
{_credits(doc.credits, z, year)}
{"".join(meters) or "<p>No meters.</p>"}
<h2>Thresholds crossed</h2>
{alerts}
</body></html>"""


def _credits(grants: list[GrantBalance], z: Zone, year: int) -> str:
    """The tenant's prepaid grants: what each gave, what usage took, what is left and until when."""
    if not grants:
        return ""
    rows = "".join(
        f'<tr data-grant="{escape(g.grant_id)}"><td>{escape(g.grant_id)}</td><td>{_money(g.currency, g.granted)}</td>'
        f"<td>{_money(g.currency, g.used)}</td><td>{_money(g.currency, g.remaining)}</td>"
        f"<td>{_when(g.expires_at, z, year, none='never')}</td><td>{escape(g.status)}"
        f"{f' ({_money(g.currency, g.expired)} expired)' if g.expired else ''}"
        f"{f' ({_money(g.currency, g.voided)} voided)' if g.voided else ''}</td></tr>"
        for g in grants
    )
    return f"""
<section class="spend" id="credits"><h2>Prepaid credits</h2>
<p>Rated usage draws on these before it is invoiced, by priority, then the soonest to expire.</p>
<table><thead><tr><th>grant</th><th>granted</th><th>used</th><th>remaining</th><th>expires</th><th>status</th></tr></thead>
<tbody>{rows}</tbody></table></section>"""


def _ms(iso: str) -> int:
    return int(_parse(iso).timestamp() * 1000)
