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
from schemas.outputs import RatedUsageLine

ZERO = Decimal(0)
Totals = tuple[Decimal, Decimal, int]  # period-to-date quantity, amount, event count


@dataclass(slots=True)
class Entry:
    """What was emitted for one register key."""

    seq: int = 0
    qty: Decimal = ZERO
    amount: Decimal = ZERO
    events: int = 0

    def copy(self) -> Entry:
        return Entry(self.seq, self.qty, self.amount, self.events)


@dataclass(slots=True)
class Settlement:
    lines: list[RatedUsageLine] = field(default_factory=list)  # to emit, in order
    emitted: dict[str, list[bytes]] = field(default_factory=dict)  # key -> history tokens to append
    reset: set[str] = field(default_factory=set)  # keys whose history restarts


def token(t: Totals) -> bytes:
    return f"{t[0]}|{t[1]}|{t[2]}".encode()


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
        q, a, n = t
        if k in seed:
            seed.discard(k)
            e.qty, e.amount, e.events = q - ln.quantity, a - ln.amount, n - ln.event_count
        dq, da, dn = q - e.qty, a - e.amount, n - e.events
        if not (dq or da or dn):
            continue  # a replay re-deriving what was already emitted
        tok = token(t)
        if tok in history[k] and not correction:
            continue  # a replay passing through an emitted state
        e.seq += 1
        e.qty, e.amount, e.events = q, a, n
        same = dq == ln.quantity and da == ln.amount and dn == ln.event_count and not correction
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
        out.lines.append(
            msgspec.structs.replace(
                ln,
                line_id=line_id(ln.tenant_id, ln.meter, ln.window_start, ln.pricing_version, rev, ln.cell, e.seq),
                quantity=dq,
                amount=da,
                event_count=dn,
                revision=rev,
            )
        )
    return out
