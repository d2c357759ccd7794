"""Settling rated lines against what was emitted: the arithmetic of the emission register.

A replay after a crash need not repeat history (batch boundaries and the idle clock
differ), and rated lines are deltas, so re-emitting "the same" line with other content
would lose or double money. Per register key (tenant, meter, period, pricing version) the
register holds the emitted period-to-date quantity, amount and event count; each line the
engine produces is re-expressed as the difference between the engine's totals and those.
Equal: nothing goes out. Different: the difference goes out, as a correction when it is not
the line itself. Recent emitted states (`history`) let a replay pass through one of them
silently; once a replay diverges, that history is dropped, since it is no longer the
engine's past. Pure: `state/register.py` reads and writes Redis around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec

from operators.windows import line_id
from schemas.outputs import CreditUse, RatedUsageLine

ZERO = Decimal(0)
# Period-to-date quantity, amount, event count and the credits drawn per grant (net of
# returns, sorted by grant; empty without grants), after a line.
Totals = tuple[Decimal, Decimal, int, tuple[tuple[str, Decimal], ...]]


@dataclass(slots=True)
class Entry:
    """What was emitted for one register key."""

    seq: int = 0
    qty: Decimal = ZERO
    amount: Decimal = ZERO
    events: int = 0
    credits: dict[str, Decimal] = field(default_factory=dict)  # per grant, net of returns

    def copy(self) -> Entry:
        return Entry(self.seq, self.qty, self.amount, self.events, dict(self.credits))


@dataclass(slots=True)
class Settlement:
    lines: list[RatedUsageLine] = field(default_factory=list)  # to emit, in order
    emitted: dict[str, list[bytes]] = field(default_factory=dict)  # key -> history tokens to append
    reset: set[str] = field(default_factory=set)  # keys whose history restarts


def token(t: Totals) -> bytes:
    base = f"{t[0]}|{t[1]}|{t[2]}"
    credits = t[3] if len(t) > 3 else ()
    return (base + "".join(f"|{g}={v}" for g, v in credits)).encode()


def settle(
    lines: list[RatedUsageLine],
    totals: list[Totals],
    key_of: Callable[[RatedUsageLine], str],
    state: dict[str, Entry],
    history: dict[str, set[bytes]],
    *,
    seed: set[str],
    correction: bool = False,
) -> Settlement:
    """Re-express `lines` (with the engine's totals after each) against `state`, which it
    updates. `seed`: keys emitted before the register existed (taken as emitted up to the
    line). `correction`: every line is a correction of what was emitted (a backfill), and
    history is not consulted."""
    out = Settlement()
    seed = set(seed)
    for ln, t in zip(lines, totals, strict=True):
        k = key_of(ln)
        e = state[k]
        q, a, n = t[0], t[1], t[2]
        cr = dict(t[3]) if len(t) > 3 else {}
        if k in seed:
            seed.discard(k)
            e.qty, e.amount, e.events = q - ln.quantity, a - ln.amount, n - ln.event_count
            e.credits = dict(cr)
            for use in ln.credits or ():
                e.credits[use.grant_id] = e.credits.get(use.grant_id, ZERO) - use.amount
        dq, da, dn = q - e.qty, a - e.amount, n - e.events
        dc = {g: v - e.credits.get(g, ZERO) for g, v in cr.items()}
        dc.update({g: -v for g, v in e.credits.items() if g not in cr})
        dc = {g: v for g, v in dc.items() if v}
        if not (dq or da or dn or dc):
            continue  # a replay re-deriving what was already emitted
        tok = token(t)
        if tok in history[k] and not correction:
            continue  # a replay passing through an emitted state
        e.seq += 1
        e.qty, e.amount, e.events = q, a, n
        e.credits = {g: v for g, v in cr.items() if v}
        mine = {u.grant_id: u.amount for u in ln.credits or ()}
        same = dq == ln.quantity and da == ln.amount and dn == ln.event_count and dc == mine and not correction
        if same:
            history[k].add(tok)
            out.emitted.setdefault(k, []).append(tok)
        else:
            # The emitted history is no longer this engine's past: passing through one of
            # its states later would not mean "already emitted". Start it afresh.
            history[k] = {tok}
            out.emitted[k] = [tok]
            out.reset.add(k)
        rev = ln.revision if same else max(ln.revision, 1)
        uses = [CreditUse(g, v) for g, v in sorted(dc.items())] or None
        out.lines.append(
            msgspec.structs.replace(
                ln,
                line_id=line_id(ln.tenant_id, ln.meter, ln.window_start, ln.pricing_version, rev, ln.cell, e.seq),
                quantity=dq,
                amount=da,
                event_count=dn,
                revision=rev,
                credits=uses if not same else ln.credits,
                net_amount=None if uses is None else da - sum(dc.values(), ZERO),
            )
        )
    return out
