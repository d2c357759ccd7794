"""The emission register in Redis: what the rating dataflow has put on `usage.rated`.

Recovery rolls the engine back to its last snapshot and replays the input after it; the
replay need not repeat history, and rated lines are deltas. So every line is settled
against what was emitted before it goes out (`operators.settlement` has the arithmetic
and why): per tenant, meter, period and pricing version this keeps the emitted
period-to-date totals, a sequence number, and the last `HISTORY` emitted states.

Lines are written here *before* they are produced to Kafka, as pending; the Kafka sink
confirms them after its flush. A pending line found by the next process (it died between
the two writes) is produced again under its own id, which the delivery ledger recognises.
The same mechanism turns a backfill (`tallyflow replay`) into corrections.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec
import orjson

from operators.ids import stable_id
from operators.settlement import Entry, Totals, settle
from runtime.redis import Patience, client
from runtime.settings import StoreSettings
from schemas.outputs import ENCODER, CreditRecord, RatedUsageLine

_LINE = msgspec.json.Decoder(RatedUsageLine)
# Emitted states remembered per key, so a crash replay that passes through them stays
# silent; a replay through more of them than this emits corrections instead (money stays
# exact, only the lines are noisier). 32 covers half an hour of 1-minute windows replayed
# within one snapshot interval.
HISTORY = 32
CACHE_KEYS = 400_000  # register keys whose state this process keeps (older ones are re-read)
# Register keys per script call: Redis runs a script alone, so each call is kept short
# (~ms), however many lines one write holds (an idle flush of 100,000 tenants at once).
CHUNK_KEYS = 500
# One Redis hash per register key: `seq`, `qty`, `amount`, `events`, `hist` (the last
# HISTORY emitted states, newline-separated), `w` (the token of the call that wrote it last)
# and `p:<line_id>` for each pending line.
# ARGV: register keys. Per key: {seq, qty, amount, events}, pending line bodies, history
# (an earlier layout's `<key>:pending` hash and `<key>:hist` list are read too).
_READ = """
local out = {}
for i = 1, #ARGV do
  local k = ARGV[i]
  local f = redis.call('HGETALL', k)
  local now, pend, hist = {false, false, false, false, false}, {}, {}
  local names = {seq = 1, qty = 2, amount = 3, events = 4, cr = 5}
  for j = 1, #f, 2 do
    local name, v = f[j], f[j + 1]
    if names[name] then now[names[name]] = v
    elseif name == 'hist' then for tok in string.gmatch(v, '[^\\n]+') do hist[#hist + 1] = tok end
    elseif string.sub(name, 1, 2) == 'p:' then pend[#pend + 1] = v end
  end
  for _, v in ipairs(redis.call('HVALS', k .. ':pending')) do pend[#pend + 1] = v end
  for _, v in ipairs(redis.call('LRANGE', k .. ':hist', 0, -1)) do hist[#hist + 1] = v end
  out[i] = {now, pend, hist}
end
return out
"""
# ARGV: ttl, history bytes, token, #confirmed keys, {key, #ids, p:ids...}..., #keys,
#       {key, expected seq, seq, qty, amount, events, reset, new history, #pending, {p:id, body}...}...
# A key whose stored seq is not the expected one was written by another process meanwhile:
# it is left alone and returned, for the caller to read again. Unless the key holds this
# call's own token: then an earlier attempt of this very call (retried after a socket
# timeout while Redis still ran it) wrote it, and it is done, not a conflict.
_WRITE = """
local ttl, keep, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local i = 4
for _ = 1, tonumber(ARGV[i]) do
  local k, n = ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('HDEL', k, unpack(ARGV, i + 3, i + 2 + n))
  i = i + 2 + n
end
i = i + 1
local conflicts = {}
for _ = 1, tonumber(ARGV[i]) do
  local k = ARGV[i + 1]
  local n = tonumber(ARGV[i + 9])
  if tonumber(redis.call('HGET', k, 'seq') or '0') == tonumber(ARGV[i + 2]) then
    local hist = ARGV[i + 8]
    if ARGV[i + 7] ~= '1' then hist = (redis.call('HGET', k, 'hist') or '') .. hist end
    if #hist > keep then hist = string.sub(hist, string.find(hist, '\\n', #hist - keep, true) + 1) end
    redis.call('HSET', k, 'seq', ARGV[i + 3], 'qty', ARGV[i + 4], 'amount', ARGV[i + 5], 'events', ARGV[i + 6], 'hist', hist,
               'w', token, unpack(ARGV, i + 10, i + 9 + 2 * n))
    redis.call('EXPIRE', k, ttl)
  elseif redis.call('HGET', k, 'w') ~= token then
    conflicts[#conflicts + 1] = k
  end
  i = i + 9 + 2 * n
end
return conflicts
"""


@dataclass(slots=True)
class Settled:
    lines: list[RatedUsageLine] = field(default_factory=list)  # to produce, in order
    resent: int = 0  # of them: pending lines of an earlier process, produced again
    confirm: dict[str, list[str]] = field(default_factory=dict)  # register key -> pending line ids
    bodies: dict[str, bytes] = field(default_factory=dict)  # line id -> its JSON, encoded once for Redis and Kafka

    def encoded(self, ln: RatedUsageLine) -> bytes:
        return self.bodies.get(ln.line_id) or ENCODER.encode(ln)


class EmissionRegister:
    def __init__(self, store: StoreSettings, on_change: Callable[[bool], None] | None = None) -> None:
        self.r = client(store.redis_url)
        self.ttl = int(store.register_ttl_days * 86_400)
        self.prefix = store.key("emitted")
        self.patience = Patience("emission register", on_change=on_change)
        # Keys this process has written or read, with the recent emitted totals: this process
        # is their only writer from then on (a write is a compare-and-set: another writer,
        # e.g. `tallyflow replay`, makes it read the key again).
        self._hist: dict[str, set[bytes]] = {}
        self._state: dict[str, Entry] = {}
        self._confirmed: dict[str, list[str]] = {}  # flushed, to be un-pended with the next write
        self._read = self.r.register_script(_READ)
        self._write_script = self.r.register_script(_WRITE)
        self._writer = f"{os.getpid():x}.{time.time_ns():x}"  # this process, in write tokens
        self._writes = 0

    def key(self, ln: RatedUsageLine) -> str:
        """Per tenant, meter, period, pricing version (and matrix cell: each telescopes alone)."""
        base = f"{self.prefix}:{ln.tenant_id}:{ln.meter}:{ln.period}:{ln.pricing_version}"
        return base if ln.dimensions is None else base + ":" + "\x1f".join(ln.dimensions.values())

    def settle(
        self,
        lines: list[RatedUsageLine],
        totals: list[Totals],
        *,
        dry_run: bool = False,
        correction: bool = False,
        read: set[str] | None = None,
    ) -> Settled:
        """Re-express the engine's lines against the register and record them as pending.
        One round trip per call: a key this process does not know is taken as never emitted
        and written with a compare-and-set against that; a key Redis does know after all
        (a restart, a rescale, `tallyflow replay`) comes back as a conflict and is read and
        settled anew (`read`: keys to read first). So a live pipeline pays per line, never
        a read per tenant. `correction`: every line is a correction of what was emitted (a
        backfill), and history is not consulted; it and dry runs read every key first."""
        out = Settled()
        if not lines:
            return out
        keys = list(dict.fromkeys(self.key(ln) for ln in lines))
        state, hist, fresh = self._load(keys, dry_run, out, keys if dry_run or correction else read or set())
        expected = {k: state[k].seq for k in keys}
        # A key the register has never seen, while the engine already has closed totals for
        # it, was emitted before the register existed (an upgrade): take that as emitted.
        seed = {k for k in fresh if state[k].seq == 0 and not hist[k]} if not correction else set()
        settled = settle(lines, totals, self.key, state, hist, seed=seed, correction=correction)
        out.lines += settled.lines
        pending: dict[str, dict[str, bytes]] = {}
        for new in settled.lines:
            pending.setdefault(self.key(new), {})[new.line_id] = out.bodies[new.line_id] = ENCODER.encode(new)
        if dry_run:
            return out
        conflicts = self._write(state, pending, expected, settled.emitted, settled.reset)
        for k in keys:
            if k in conflicts:  # another process wrote it since: forget, read again below
                self._state.pop(k, None)
                self._hist.pop(k, None)
                continue
            h = hist[k]
            self._hist[k] = h if len(h) <= 2 * HISTORY else set(settled.emitted.get(k, []))
            self._state[k] = state[k]
        if len(self._state) > CACHE_KEYS:  # forget the oldest half: they are re-read if they come back
            for k in list(self._state)[: len(self._state) // 2]:
                del self._state[k], self._hist[k]
        out.confirm = {k: list(v) for k, v in pending.items() if k not in conflicts}
        for ln in out.lines[: out.resent]:
            out.confirm.setdefault(self.key(ln), []).append(ln.line_id)
        return self._again(out, lines, totals, conflicts, correction) if conflicts else out

    def _load(
        self, keys: list[str], dry_run: bool, out: Settled, read: Collection[str]
    ) -> tuple[dict[str, Entry], dict[str, set[bytes]], list[str]]:
        """State and history of `keys`: from this process's cache, read (with the pending
        lines an earlier process left, which go out again first), or taken as never
        emitted (the write's compare-and-set finds out otherwise)."""
        fresh = [k for k in keys if k not in self._state or k in read]
        asked = [k for k in fresh if k in read]
        res: list[Any] = []
        for i in range(0, len(asked), CHUNK_KEYS):
            part = asked[i : i + CHUNK_KEYS]
            res += self.patience(lambda part=part: self._read(args=part))  # type: ignore[misc]
        state: dict[str, Entry] = {}
        hist: dict[str, set[bytes]] = {}
        for k in keys:
            if k in self._state and k not in read:
                e, h = self._state[k], self._hist[k]
                state[k], hist[k] = (e.copy(), set(h)) if dry_run else (e, h)  # a dry run leaves the cache as it was
        for k in fresh:
            state[k], hist[k] = Entry(), set()
        for k, (now, pend, past) in zip(asked, res, strict=True):
            state[k] = _entry(now)
            hist[k] = set(past)
            if not dry_run:
                # Sent again as the very bytes the dead process produced (and wrote here).
                for ln, v in sorted(((_LINE.decode(v), bytes(v)) for v in pend), key=lambda p: p[0].line_id):
                    out.lines.append(ln)
                    out.bodies[ln.line_id] = v
        out.resent = len(out.lines)
        return state, hist, fresh

    def _write(
        self,
        state: dict[str, Entry],
        pending: dict[str, dict[str, bytes]],
        expected: dict[str, int],
        emitted: dict[str, list[bytes]],
        reset: set[str],
    ) -> set[str]:
        """Script calls of at most CHUNK_KEYS keys each (a pipeline of per-key commands costs
        ~40 µs each in redis-py; one script for everything would hold Redis for seconds):
        confirmations, then per key its totals, pending lines and history. Each call carries
        a token of its own, so a retry of a call that did happen is recognised, not taken for
        another writer. Returns the keys another process wrote since they were read."""
        confirmed, self._confirmed = list(self._confirmed.items()), {}
        touched = list(pending)
        conflicts: set[str] = set()
        for i in range(0, max(len(confirmed), len(touched)), CHUNK_KEYS):
            self._writes += 1
            args: list[str | int | bytes] = [self.ttl, HISTORY * 64, f"{self._writer}.{self._writes}"]
            part = confirmed[i : i + CHUNK_KEYS]
            args.append(len(part))
            for k, ids in part:
                args += [k, len(ids), *(f"p:{line_id}" for line_id in ids)]
            keys = touched[i : i + CHUNK_KEYS]
            args.append(len(keys))
            for k in keys:
                e = state[k]
                hist = b"".join(b"\n" + t for t in emitted[k])
                # The credits emitted so far ride with the pending lines' fields (`cr`, JSON).
                args += [k, expected[k], e.seq, str(e.qty), str(e.amount), e.events, int(k in reset), hist, len(pending[k]) + 1]
                args += ["cr", orjson.dumps([[g, str(v)] for g, v in sorted(e.credits.items())])]
                for line_id, body in pending[k].items():
                    args += [f"p:{line_id}", body]
            got = self.patience(lambda args=args: self._write_script(args=args))  # type: ignore[misc]
            conflicts.update(c.decode() if isinstance(c, bytes) else c for c in got)
        return conflicts

    def _again(self, out: Settled, lines: list[RatedUsageLine], totals: list[Totals], conflicts: set[str], correction: bool) -> Settled:
        """Settle the lines of conflicting keys anew, against what the other process wrote."""
        again = [(ln, t) for ln, t in zip(lines, totals, strict=True) if self.key(ln) in conflicts]
        sub = self.settle([ln for ln, _ in again], [t for _, t in again], correction=correction, read=conflicts)
        kept = [ln for ln in out.lines[out.resent :] if self.key(ln) not in conflicts]
        merged = Settled(out.lines[: out.resent] + sub.lines[: sub.resent] + kept + sub.lines[sub.resent :], out.resent + sub.resent)
        merged.confirm = out.confirm
        # Only the bodies of lines that go out: the first attempt's lines of conflicting keys were
        # settled against a wrong state, and one of them may share its id (same window, revision
        # and sequence) with a pending line the other writer left, which goes out again.
        keep = {ln.line_id for ln in out.lines[: out.resent]} | {ln.line_id for ln in kept}
        merged.bodies = {i: b for i, b in out.bodies.items() if i in keep}
        merged.bodies.update(sub.bodies)
        for k, ids in sub.confirm.items():
            merged.confirm.setdefault(k, []).extend(ids)
        return merged

    def confirm(self, merged: Mapping[str, list[str]], *, now: bool = False) -> None:
        """After the Kafka flush: those lines are on the topic, no longer pending. Recorded
        with the next write (saving a round trip) unless `now`; a crash before that only
        makes the next process produce them once more under their own ids."""
        for k, ids in merged.items():
            self._confirmed.setdefault(k, []).extend(ids)
        if not now or not self._confirmed:
            return
        merged, self._confirmed = self._confirmed, {}

        def delete() -> None:
            p = self.r.pipeline(transaction=False)
            for k, ids in merged.items():
                p.hdel(k, *(f"p:{i}" for i in ids))
            p.execute()

        self.patience(delete)

    def settle_records(self, records: list[CreditRecord]) -> tuple[list[CreditRecord], dict[str, dict[str, str]]]:
        """Grant-level credit records (granted, expired, voided) against what went out: one
        emitted is not emitted again; one a replay derives otherwise goes out as a correction
        of the difference (`seq` + 1). Returns the records to produce and what to `commit`
        once they are on the topic (produced first: a crash between makes the next process
        produce them again under the same ids, which are harmless)."""
        if not records:
            return [], {}
        keys = sorted({f"{self.prefix}:credits:{r.tenant_id}" for r in records})
        p = self.r.pipeline(transaction=False)
        for k in keys:
            p.hgetall(k)
        stored: dict[str, dict[str, str]] = {
            k: {f.decode(): v.decode() for f, v in h.items()} for k, h in zip(keys, self.patience(p.execute), strict=True)
        }
        out: list[CreditRecord] = []
        commit: dict[str, dict[str, str]] = {}
        for r in records:
            k, f = f"{self.prefix}:credits:{r.tenant_id}", f"{r.grant_id}\x1f{r.kind}"
            was = commit.get(k, {}).get(f) or stored[k].get(f)
            if was is None:
                if not r.amount:
                    continue  # nothing expired or voided, and nothing went out to correct
                out.append(r)
                commit.setdefault(k, {})[f] = f"1|{r.amount}"
                continue
            seq, amount = was.split("|", 1)
            if Decimal(amount) == r.amount:
                continue  # a replay re-deriving what went out
            n = int(seq) + 1
            out.append(msgspec.structs.replace(r, record_id=stable_id(r.record_id, n), amount=r.amount - Decimal(amount), seq=n))
            commit.setdefault(k, {})[f] = f"{n}|{r.amount}"
        return out, commit

    def commit_records(self, commit: dict[str, dict[str, str]]) -> None:
        if not commit:
            return

        def write() -> None:
            p = self.r.pipeline(transaction=False)
            for k, fields in commit.items():
                for f, v in fields.items():
                    p.hset(k, f, v)
                p.expire(k, self.ttl)
            p.execute()

        self.patience(write)

    def totals(self, keys: Iterable[str]) -> Mapping[str, Totals]:
        """Emitted period-to-date totals per register key (for checks and reconciliation)."""
        ks = list(keys)
        p = self.r.pipeline(transaction=False)
        for k in ks:
            p.hmget(k, "seq", "qty", "amount", "events", "cr")
        return {
            k: (e.qty, e.amount, e.events, tuple(sorted(e.credits.items())))
            for k, e in ((k, _entry(v)) for k, v in zip(ks, p.execute(), strict=True))
        }


def _entry(v: list[bytes | None]) -> Entry:
    seq, qty, amount, events = v[:4]
    if seq is None:
        return Entry()
    cr = v[4] if len(v) > 4 else None
    credits = {g: Decimal(x) for g, x in orjson.loads(cr)} if cr else {}
    return Entry(int(seq), Decimal(qty.decode()), Decimal(amount.decode()), int(events), credits)  # type: ignore[union-attr,arg-type]
