"""`GET /tenants/{tenant}`: one tenant's usage for people, as a small HTML page (no script).

Per meter: a bar of the usage under the plan in force against its included quantity (past
it, the overage in another colour), a tick at each threshold level and at the hard limit,
the figures, and the amount to date; below, the levels crossed in the period, newest first.
"""

from __future__ import annotations

from decimal import Decimal
from html import escape

from operators.catalog_index import CatalogIndex
from schemas.usage import MeterUsage, TenantUsage

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:56rem;color:#1d2330;padding:0 1rem}
h1{font-size:1.4rem;margin:0}.sub{color:#5b6473;margin:.2rem 0 1.2rem}
nav a{margin-right:.6rem}nav a.on{font-weight:600;text-decoration:none;color:#1d2330}
.meter{border:1px solid #dde2ea;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}
.meter h2{font-size:1.05rem;margin:0 0 .4rem;display:flex;justify-content:space-between}
.bar{position:relative;height:22px;background:#eef1f5;border-radius:4px;overflow:hidden}
.in{position:absolute;left:0;top:0;bottom:0;background:#3b82c4}
.over{position:absolute;top:0;bottom:0;background:#e08a2e}
.tick{position:absolute;top:0;bottom:0;width:2px;background:#1d2330;opacity:.55}
.tick.hard{background:#c62828;opacity:1;width:3px}
.figs{display:flex;flex-wrap:wrap;gap:.3rem 1.4rem;margin-top:.5rem;color:#39414f}
.figs b{color:#1d2330}.closed{color:#c62828;font-weight:600}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eef1f5}
.legend span{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin:0 .3rem 0 .8rem;vertical-align:-1px}
"""


def _n(v: Decimal | None) -> str:
    """A quantity or amount as people read it: thousands separated, no exponent."""
    if v is None:
        return "—"
    q = v.normalize()
    return f"{q:,f}" if q == q.to_integral_value() else f"{v:,f}"


def _meter(m: MeterUsage, marks: list[tuple[str, Decimal]]) -> str:
    top = max([m.used, m.included, m.hard_limit or Decimal(0), *(limit for _, limit in marks)]) or Decimal(1)
    scale = top * Decimal("1.1")

    def pct(v: Decimal) -> str:
        return f"{min(v / scale * 100, Decimal(100)):.2f}%"

    inside, over = min(m.used, m.included), max(m.used - m.included, Decimal(0))
    ticks = "".join(f'<div class="tick" style="left:{pct(limit)}" title="{escape(name)}: {_n(limit)}"></div>' for name, limit in marks)
    if m.hard_limit is not None:
        ticks += f'<div class="tick hard" style="left:{pct(m.hard_limit)}" title="hard limit: {_n(m.hard_limit)}"></div>'
    access = "" if m.has_access else ' <span class="closed">access closed: hard limit reached</span>'
    return f"""
<section class="meter" id="meter-{escape(m.meter)}">
  <h2><span>{escape(m.meter)}{access}</span><span class="amount">{escape(m.currency)} {_n(m.amount)}</span></h2>
  <div class="bar" role="img" aria-label="{escape(m.meter)}: {_n(m.used)} used of {_n(m.included)} included">
    <div class="in" style="width:{pct(inside)}"></div>
    <div class="over" style="left:{pct(inside)};width:{pct(over)}"></div>{ticks}
  </div>
  <div class="figs">
    <span>used <b class="used">{_n(m.used)}</b> of <b class="included">{_n(m.included)}</b> included</span>
    <span>remaining <b class="remaining">{_n(m.remaining)}</b></span>
    <span>overage <b class="overage">{_n(m.overage)}</b></span>
    <span>hard limit <b>{_n(m.hard_limit) if m.hard_limit is not None else "none (soft)"}</b></span>
    <span>rated so far <b>{escape(m.currency)} {_n(m.amount_rated)}</b></span>
    <span>plan <b>{escape(m.pricing_version)}</b></span>
    <span>last event <b>{escape(m.last_event_time or "—")}</b></span>
  </div>
</section>"""


def render(doc: TenantUsage, cat: CatalogIndex, periods: list[str]) -> str:
    """The page; every value from the read model or the catalog is escaped."""
    meters = []
    for slug in sorted(doc.meters):
        m = doc.meters[slug]
        plan = cat.plans_by_version.get(m.pricing_version)
        pmi = plan.meters.get(slug) if plan else None
        marks = [(lv.name, lv.limit) for lv in pmi.levels] if pmi else []
        meters.append(_meter(m, marks))
    crossed = sorted(
        ((lv.crossed_at or "", slug, lv) for slug, m in doc.meters.items() for lv in m.levels), key=lambda x: x[0], reverse=True
    )
    rows = "".join(
        f"<tr><td>{escape(at or 'before the read model')}</td><td>{escape(slug)}</td><td>{escape(lv.level)}</td>"
        f"<td>{_n(lv.limit)}</td><td>{escape(lv.pricing_version)}</td></tr>"
        for at, slug, lv in crossed[:20]
    )
    alerts = (
        f"<table><tr><th>crossed at</th><th>meter</th><th>level</th><th>limit</th><th>plan</th></tr>{rows}</table>"
        if rows
        else "<p>No threshold crossed in this period.</p>"
    )
    tid = escape(doc.tenant_id)
    nav = " ".join(f'<a href="?period={escape(p)}"{" class=on" if p == doc.period else ""}>{escape(p)}</a>' for p in periods)
    totals: dict[str, Decimal] = {}
    for m in doc.meters.values():
        totals[m.currency] = totals.get(m.currency, Decimal(0)) + m.amount
    total = ", ".join(f"{escape(c)} {_n(v)}" for c, v in sorted(totals.items())) or "nothing"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Usage of {tid} · {escape(doc.period)} · Tallyflow</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>Usage of <span id="tenant">{tid}</span> in <span id="period">{escape(doc.period)}</span></h1>
<p class="sub">Amount to date <b id="total">{total}</b> · {doc.events:,} events · as of {escape(doc.as_of)} ·
events up to {escape(doc.watermark or "none yet")}</p>
<nav>{nav}</nav>
<p class="legend"><span style="background:#3b82c4"></span>within included<span style="background:#e08a2e"></span>overage
<span style="background:#1d2330;opacity:.55;width:3px"></span>threshold<span style="background:#c62828;width:3px"></span>hard limit</p>
{"".join(meters) or "<p>No meters.</p>"}
<h2>Thresholds crossed</h2>
{alerts}
</body></html>"""
