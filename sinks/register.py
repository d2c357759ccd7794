"""The emission register in Redis: what the rating dataflow has put on `usage.rated`.

Recovery rolls the engine back to its last snapshot and replays the input after it. The
replay need not repeat history: batch boundaries, partition interleaving and the idle
clock differ, so a window may close with other events or a correction may be split in
two. Rated lines are deltas, so re-emitting "the same" line with different content would
lose or double money at the ERP. The register makes replays harmless by settling every
line against what was emitted: per tenant, meter, period and pricing version it keeps the
emitted period-to-date quantity, amount and event count and a sequence number; each line
the engine produces is re-expressed as the difference between the engine's period-to-date
totals and the register's. When the replay agrees with history the difference is zero and
nothing is emitted; when it differs, the difference goes out as a correction (revision
>= 1, signed delta). So the ERP's sum always equals the engine's totals. The register also
remembers the last `HISTORY` totals it emitted per key: a replay passing through one of
them is re-deriving history (its events were emitted already) and emits nothing, instead of
a negative correction followed by positive ones. Event counts grow with every emission,
so a new emission never equals an old state; once a replay diverges (emits a difference),
the old history is dropped, since it is no longer the engine's past.

Lines are written here *before* they are produced to Kafka, as pending; the Kafka sink
confirms them after its flush. A pending line found by the next process (it died between
the two writes) is produced again under its own id, which the delivery ledger recognises.
The same mechanism turns a backfill (`tallyflow replay`) into corrections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import msgspec
import redis

from operators.rating import stable_id
from schemas.outputs import ENCODER, RatedUsageLine
from sinks.patience import Patience

_LINE = msgspec.json.Decoder(RatedUsageLine)
HISTORY = 256
_ZERO = Decimal(0)
Totals = tuple[Decimal, Decimal, int]  # period-to-date quantity, amount, event count


@dataclass(slots=True)
class _Entry:
    seq: int = 0
    qty: Decimal = _ZERO
    amount: Decimal = _ZERO
    events: int = 0


@dataclass(slots=True)
class Settled:
    lines: list[RatedUsageLine] = field(default_factory=list)  # to produce, in order
    resent: int = 0  # of them: pending lines of an earlier process, produced again
    confirm: dict[str, list[str]] = field(default_factory=dict)  # register key -> pending line ids


class EmissionRegister:
    def __init__(
        self, url: str, ttl_seconds: int, prefix: str = "tallyflow:emitted", on_change: Callable[[bool], None] | None = None
    ) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.ttl = ttl_seconds
        self.prefix = prefix
        self.patience = Patience("emission register", on_change=on_change)
        # Keys this process has read (their pending lines were produced again), with the
        # recent emitted totals; this process is their only writer from then on.
        self._hist: dict[str, set[bytes]] = {}

    def key(self, ln: RatedUsageLine) -> str:
        return f"{self.prefix}:{ln.tenant_id}:{ln.meter}:{ln.period}:{ln.pricing_version}"

    def settle(self, lines: list[RatedUsageLine], totals: list[Totals], *, dry_run: bool = False, correction: bool = False) -> Settled:
        """Re-express the engine's lines against the register and record them as pending.
        Two round trips per call, whatever the number of lines. `correction`: every line
        is a correction of what was emitted (a backfill), and history is not consulted."""
        out = Settled()
        if not lines:
            return out
        keys = list(dict.fromkeys(self.key(ln) for ln in lines))
        fresh = [k for k in keys if k not in self._hist]

        def read() -> list[object]:
            p = self.r.pipeline(transaction=False)
            for k in keys:
                p.hmget(k, "seq", "qty", "amount", "events")
            for k in fresh:
                p.hvals(k + ":pending")
                p.lrange(k + ":hist", 0, -1)
            return p.execute()

        res = self.patience(read)
        state = {k: _entry(v) for k, v in zip(keys, res[: len(keys)], strict=True)}  # type: ignore[arg-type]
        hist = {k: self._hist.get(k) or set() for k in keys}
        for i, k in enumerate(fresh):
            pend, past = res[len(keys) + 2 * i], res[len(keys) + 2 * i + 1]
            hist[k] = set(past)  # type: ignore[call-overload]
            if not dry_run:
                out.lines += sorted((_LINE.decode(v) for v in pend), key=lambda ln: ln.line_id)  # type: ignore[attr-defined]
        out.resent = len(out.lines)
        pending: dict[str, dict[str, bytes]] = {}
        emitted: dict[str, list[bytes]] = {}
        reset: set[str] = set()
        for ln, (q, a, n) in zip(lines, totals, strict=True):
            k = self.key(ln)
            e = state[k]
            dq, da, dn = q - e.qty, a - e.amount, n - e.events
            if not (dq or da or dn):
                continue  # a replay re-deriving what was already emitted
            token = f"{q}|{a}|{n}".encode()
            if token in hist[k] and not correction:
                continue  # a replay passing through an emitted state
            e.seq += 1
            e.qty, e.amount, e.events = q, a, n
            same = dq == ln.quantity and da == ln.amount and dn == ln.event_count and not correction
            if same:
                hist[k].add(token)
                emitted.setdefault(k, []).append(token)
            else:
                # The emitted history is no longer this engine's past: passing through one
                # of its states later would not mean "already emitted". Start it afresh.
                hist[k] = {token}
                emitted[k] = [token]
                reset.add(k)
            rev = ln.revision if same else max(ln.revision, 1)
            new = msgspec.structs.replace(
                ln,
                line_id=stable_id("line", ln.tenant_id, ln.meter, ln.window_start, ln.pricing_version, rev, e.seq),
                quantity=dq,
                amount=da,
                event_count=dn,
                revision=rev,
            )
            out.lines.append(new)
            pending.setdefault(k, {})[new.line_id] = ENCODER.encode(new)
        if dry_run:
            return out
        touched = {k: state[k] for k in pending}

        def write() -> None:
            p = self.r.pipeline(transaction=True)
            for k, e in touched.items():
                p.hset(k, mapping={"seq": e.seq, "qty": str(e.qty), "amount": str(e.amount), "events": e.events})
                p.hset(k + ":pending", mapping=pending[k])  # type: ignore[arg-type]  # Mapping keys are invariant
                if k in reset:
                    p.delete(k + ":hist")
                p.rpush(k + ":hist", *emitted[k])
                p.ltrim(k + ":hist", -HISTORY, -1)
                for suffix in ("", ":pending", ":hist"):
                    p.expire(k + suffix, self.ttl)
            p.execute()

        if touched:
            self.patience(write)
        for k in keys:
            h = hist[k]
            self._hist[k] = h if len(h) <= 2 * HISTORY else set(emitted.get(k, []))
        out.confirm = {k: list(v) for k, v in pending.items()}
        for ln in out.lines[: out.resent]:
            out.confirm.setdefault(self.key(ln), []).append(ln.line_id)
        return out

    def confirm(self, merged: Mapping[str, list[str]]) -> None:
        """After the Kafka flush: those lines are on the topic, no longer pending."""
        if not merged:
            return

        def delete() -> None:
            p = self.r.pipeline(transaction=False)
            for k, ids in merged.items():
                p.hdel(k + ":pending", *ids)
            p.execute()

        self.patience(delete)

    def totals(self, keys: Iterable[str]) -> Mapping[str, Totals]:
        """Emitted period-to-date totals per register key (for checks and reconciliation)."""
        ks = list(keys)
        p = self.r.pipeline(transaction=False)
        for k in ks:
            p.hmget(k, "seq", "qty", "amount", "events")
        return {k: (e.qty, e.amount, e.events) for k, e in ((k, _entry(v)) for k, v in zip(ks, p.execute(), strict=True))}


def _entry(v: list[bytes | None]) -> _Entry:
    seq, qty, amount, events = v
    if seq is None:
        return _Entry()
    return _Entry(int(seq), Decimal(qty.decode()), Decimal(amount.decode()), int(events))  # type: ignore[union-attr,arg-type]
