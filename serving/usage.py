"""Usage and entitlement queries: the read model in Redis (written by the rating dataflow),
read through the catalog for what it does not hold (a tenant's plan, the current period,
a meter's included quantity before its first event). Nothing here writes anywhere, and no
request scans Redis: every key read is named exactly, from the catalog.

**What a check costs.** A product asks "may t-0042 still call this?" on every request it
serves, so the answer is made once per version of the tenant's document, not per request:
each process keeps, per document it has read, the facts, the figures derived from them and
every JSON answer already encoded (per meter and pricing version in force). A request whose
document is current asks Redis nothing: it resolves the period and plan (kept per tenant and
period asked, valid until the next period or plan change), finds the encoded answer, and
that is all. A document is current while this process's subscription to the read model's
announcements (`state.read_model.ReadModelChanges`) has been live since it was read, no
newer version of it has been announced, and its version was confirmed less than
`MAX_AGE_S` ago. Otherwise the request reads it again, in one round trip (`HMGET doc r v`),
and answers from the facts again only if its version changed (an entitlement needs one
meter's quantity under the version in force, not the whole derivation the usage route makes).

**Staleness without announcements.** Should an announcement never come (a writer from
before announcements, mid upgrade), `keep_fresh` asks Redis every `CONFIRM_S` for the
versions of the documents answered since, in one round trip per `CONFIRM_BATCH` keys, off
the requests' path: a changed one is found within that (and counted,
`tallyflow_api_unannounced_changes`), and a document nobody asked for is not confirmed and
is read again after `MAX_AGE_S`.

**Never backwards.** Versions only grow for a key (`state/read_model.py`), and a process
keeps the newest it has read: a read answered older than that (a Redis that lost its data,
or answers from behind) is not taken, the newer one is answered (and counts as confirmed:
Redis has nothing newer). An announcement that arrives while its key is being read (the read
may have been answered before the write) leaves what was read not current, so the next
request reads again. Each process has its own subscription and cache, so
several worker processes behind one port each stay as fresh as the announcements.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
from prometheus_client import Counter

from operators.catalog_index import CatalogIndex, PlanIndex
from operators.periods import Period, iso, period_of
from operators.usage import ZERO, UnknownVersion, balances, credits_remaining, derive, empty_usage, entitlement, plan_in_force
from runtime.catalog_watch import CatalogWatch
from runtime.redis import TRANSIENT
from schemas.usage import ENCODER, USAGE_FACTS, Credits, TenantUsage, UsageFacts
from state.read_model import NO_DOCUMENT, ReadModelReader, Version, key

_FORMATS = {
    "month": (re.compile(r"^\d{4}-\d{2}$"), "%Y-%m", "YYYY-MM"),
    "day": (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "%Y-%m-%d", "YYYY-MM-DD"),
}
CONFIRM_S = 2.0  # versions of the documents answered are confirmed this often (the bound on staleness without announcements)
CONFIRM_BATCH = 256  # keys per confirming round trip (the event loop is never held long by one)
MAX_AGE_S = 5.0  # a document not confirmed for this long is read again by the next request for it
MAX_DOCUMENTS = 200_000  # documents kept per process (the oldest read go first past it)
MAX_RESOLVED = 200_000  # (tenant, period asked) resolutions kept per process
_NEVER, _ALWAYS = -(2**62), 2**62
_AS_OF = "\x00as_of\x00"  # where `as_of` (now) goes in an answer without usage
_AS_OF_JSON = ENCODER.encode(_AS_OF)
UNANNOUNCED = Counter(
    "tallyflow_api_unannounced_changes", "Read-model documents found changed by the periodic confirmation, not by an announcement."
)


class NotFound(Exception):
    """404: the message says what is not there."""


PAGE_PERIODS = 36  # the usage page links periods with usage among the tenant's last 36 (3 years monthly)


class Unavailable(Exception):
    """503: the usage names a pricing version this process's catalog has not loaded yet."""


class ReadModelDown(Unavailable):
    """503: Redis does not answer (the detail is for /readyz, not for clients)."""

    def __init__(self) -> None:
        super().__init__("the usage store does not answer; ask again in a few seconds")


class BadRequest(Exception):
    """400: the message names the parameter and the fix."""


class _Document:
    """One read-model document as this process last read it, and what was made from it."""

    __slots__ = ("answers", "epoch", "facts", "stale", "usage", "used", "verified", "version")

    def __init__(self, version: Version, facts: UsageFacts | None) -> None:
        self.version, self.facts = version, facts
        self.usage: TenantUsage | None = None  # derived on first use
        self.answers: dict[tuple[str, str | None, str], bytes | tuple[bytes, bytes]] = {}  # encoded, per question
        self.epoch = -1  # the subscription epoch it was read in
        self.verified = 0.0  # monotonic time its version was last confirmed (when that read was sent)
        self.stale = False  # a newer version was announced
        self.used = False  # answered since the last confirmation round


class _Resolved(msgspec.Struct, gc=False):
    """The period and plan a (tenant, period asked) means while now is in [lo, hi)."""

    period: Period
    plan: PlanIndex
    lo: int
    hi: int


class Queries:
    def __init__(self, watch: CatalogWatch, reader: ReadModelReader | None) -> None:
        self.watch, self.reader = watch, reader
        self.prefix = reader.prefix if reader is not None else ""
        self._index: CatalogIndex | None = None
        self._resolved: dict[tuple[str, str | None], _Resolved] = {}
        # (tenant, meter, period asked) -> the resolution, document and answer last given:
        # valid while the resolution holds for now and the document is current.
        self._hot: dict[tuple[str, str, str | None], tuple[_Resolved, _Document, bytes | tuple[bytes, bytes]]] = {}
        self._docs: dict[str, _Document] = {}
        self._reading: dict[str, int] = {}  # key -> reads in flight
        self._announced: dict[str, Version] = {}  # key being read -> the newest version announced meanwhile
        self.live = False  # the announcements' subscription is live
        self.epoch = 0  # counts the subscription's changes: a document read in another epoch is not current
        self.reads = 0  # round trips to Redis for documents (what tests and the bench look at)
        self.unannounced = 0  # changed versions found by confirmation, not by announcement

    # -- the announcements (state.read_model.ReadModelChanges calls these, on this event loop) ----

    def set_live(self, live: bool) -> None:
        """The subscription became live (announcements from now on arrive) or was lost (some
        may be missed): either way, nothing read before is current any more."""
        self.live = live
        self.epoch += 1

    def changed(self, changes: list[tuple[str, Version]]) -> None:
        docs, reading, announced = self._docs, self._reading, self._announced
        for k, version in changes:
            d = docs.get(k)
            if d is not None and version > d.version:
                d.stale = True
            if k in reading and version > announced.get(k, NO_DOCUMENT):
                announced[k] = version

    # -- queries ------------------------------------------------------------------------------------

    def _catalog(self) -> CatalogIndex:
        """The catalog in use; a reloaded one drops everything made with the one before."""
        self.watch.poll()
        cat = self.watch.index
        if cat is not self._index:
            self._index = cat
            self._resolved.clear()
            self._docs.clear()
            self._hot.clear()
        return cat

    def _plan(self, cat: CatalogIndex, tenant_id: str, at_ms: int) -> PlanIndex:
        ti = cat.tenants.get(tenant_id)
        if ti is None:
            raise NotFound(f"no tenant '{tenant_id}' in the catalog")
        return plan_in_force(cat, tenant_id, at_ms) or ti.plans[-1]  # before or after its contract: its nearest plan

    def period(self, tenant_id: str, key_asked: str | None, now_ms: int) -> tuple[Period, PlanIndex]:
        """The period asked for (default: the current one) and the plan in force for it."""
        r = self._resolve(self._catalog(), tenant_id, key_asked, now_ms)
        return r.period, r.plan

    def _resolve(self, cat: CatalogIndex, tenant_id: str, key_asked: str | None, now_ms: int) -> _Resolved:
        r = self._resolved.get((tenant_id, key_asked))
        if r is not None and r.lo <= now_ms < r.hi:
            return r
        plan = self._plan(cat, tenant_id, now_ms)
        ti = cat.tenants[tenant_id]
        i = bisect.bisect_right(ti.change_ms, now_ms)  # the plan changes around now bound the answer's validity
        lo, hi = ti.change_ms[i - 1] if i else _NEVER, ti.change_ms[i] if i < len(ti.change_ms) else _ALWAYS
        kind = plan.billing_period
        if key_asked is None:
            p = period_of(now_ms, kind)
        else:
            pattern, fmt, shape = _FORMATS[kind]
            try:
                if not pattern.match(key_asked):
                    raise ValueError
                start = datetime.strptime(key_asked, fmt).replace(tzinfo=UTC)
            except ValueError:
                raise BadRequest(f"period: '{key_asked}' is not a billing period of this tenant; use {shape}") from None
            p = period_of(int(start.timestamp() * 1000), kind)
            plan = self._plan(cat, tenant_id, max(p.start_ms, min(now_ms, p.end_ms - 1)))
        if now_ms < p.start_ms:  # a future period: its plan is the one at its start until it begins
            hi = min(hi, p.start_ms)
        elif now_ms >= p.end_ms:  # a past period: its plan is the one at its end from now on
            lo = max(lo, p.end_ms)
        else:
            lo, hi = max(lo, p.start_ms), min(hi, p.end_ms)
        r = _Resolved(p, plan, lo, hi)
        if len(self._resolved) >= MAX_RESOLVED:
            self._resolved.clear()
        self._resolved[(tenant_id, key_asked)] = r
        return r

    async def entitlement_json(self, tenant_id: str, meter: str, key_asked: str | None) -> bytes:
        """The entitlement answer, encoded: measured under the pricing version in force (after
        a plan change: the usage rated under it, the quantity its `included` applies to)."""
        cat = self._catalog()
        now_ms = int(time.time() * 1000)
        question = (tenant_id, meter, key_asked)
        hot = self._hot.get(question)  # the answer last given to this very question, and what it rests on
        if hot is not None:
            hr, hd, ha = hot
            if hr.lo <= now_ms < hr.hi and self._is_current(hd):
                hd.used = True
                return ha if isinstance(ha, bytes) else ha[0] + ENCODER.encode(iso(now_ms)) + ha[1]
        r = self._resolve(cat, tenant_id, key_asked, now_ms)
        pv = r.plan.pricing_version
        pmi = r.plan.meters.get(meter)
        if pmi is None:
            raise NotFound(f"meter '{meter}' is not in plan {pv} of tenant '{tenant_id}'")
        k = key(self.prefix, tenant_id, r.period.key)
        d = self._docs.get(k)
        if d is None or not self._is_current(d):
            d = await self._read(k)
        d.used = True
        ans = d.answers.get(("entitlement", meter, pv))
        if ans is None:
            f = d.facts
            if f is None:  # no usage yet: as of now, every time
                head, _, tail = ENCODER.encode(entitlement(tenant_id, r.period.key, pmi, pv, ZERO, _AS_OF, None)).partition(_AS_OF_JSON)
                ans = (head, tail)
            else:
                used = ZERO
                for m in f.meters:
                    if m.meter == meter:
                        for v in m.versions:
                            if v.pricing_version not in cat.plans_by_version:
                                raise Unavailable(
                                    f"pricing version {v.pricing_version} is not in the catalog loaded here; "
                                    "the catalog is reloaded every few seconds, ask again"
                                )
                            if v.pricing_version == pv:
                                used = v.quantity
                left = credits_remaining(f, meter, pmi.plan.currency, f.as_of_ms) if f.grants else ZERO
                ans = ENCODER.encode(entitlement(tenant_id, r.period.key, pmi, pv, used, iso(f.as_of_ms), iso(f.watermark_ms), left))
            d.answers[("entitlement", meter, pv)] = ans
        if len(self._hot) >= MAX_RESOLVED:
            self._hot.clear()
        self._hot[question] = (r, d, ans)
        if isinstance(ans, tuple):
            return ans[0] + ENCODER.encode(iso(now_ms)) + ans[1]
        return ans

    async def usage(self, tenant_id: str, key_asked: str | None, meter: str | None = None) -> TenantUsage:
        """The read model's figures, or zeros from the catalog for a period without usage.
        What it returns may be shared with other requests: read it, do not change it."""
        cat = self._catalog()
        now_ms = int(time.time() * 1000)
        r = self._resolve(cat, tenant_id, key_asked, now_ms)
        p, plan = r.period, r.plan
        d = await self._current(key(self.prefix, tenant_id, p.key))
        doc = self._usage_of(d) if d.facts is not None else empty_usage(cat, tenant_id, plan, p, now_ms)
        if meter is not None:
            if meter not in doc.meters and meter not in plan.meters:
                raise NotFound(f"meter '{meter}' is not in plan {plan.pricing_version} of tenant '{tenant_id}' nor in its usage")
            m = doc.meters.get(meter) or empty_usage(cat, tenant_id, plan, p, now_ms).meters[meter]
            doc = msgspec.structs.replace(doc, meters={meter: m})
        return doc

    async def usage_json(self, tenant_id: str, key_asked: str | None, meter: str | None = None) -> bytes:
        """`usage`, encoded (once per document version and meter asked, where there is usage)."""
        cat = self._catalog()
        r = self._resolve(cat, tenant_id, key_asked, int(time.time() * 1000))
        d = await self._current(key(self.prefix, tenant_id, r.period.key))
        d.used = True
        if d.facts is None:  # as of now: made per request
            return ENCODER.encode(await self.usage(tenant_id, key_asked, meter))
        ans = d.answers.get(("usage", meter, r.plan.pricing_version))
        if not isinstance(ans, bytes):
            ans = d.answers[("usage", meter, r.plan.pricing_version)] = ENCODER.encode(await self.usage(tenant_id, key_asked, meter))
        return ans

    async def credits(self, tenant_id: str, key_asked: str | None) -> Credits:
        """The tenant's grants as of the period's document (default: the current period's;
        without one yet, the newest of its recent periods with a document: grants outlive
        periods, and each document carries them all as of its writing)."""
        cat = self._catalog()
        now_ms = int(time.time() * 1000)
        r = self._resolve(cat, tenant_id, key_asked, now_ms)
        period = r.period.key
        d = await self._current(key(self.prefix, tenant_id, period))
        if d.facts is None and key_asked is None:
            for p in await self.periods(tenant_id):
                if p != period:
                    d, period = await self._current(key(self.prefix, tenant_id, p)), p
                    break
        f = d.facts
        if f is None:
            return Credits(tenant_id=tenant_id, period=period, as_of=None, watermark=None, remaining={}, grants=[])
        grants = balances(f)
        remaining: dict[str, Decimal] = {}
        for g in grants:
            if g.status == "active":
                remaining[g.currency] = remaining.get(g.currency, ZERO) + g.remaining
        return Credits(
            tenant_id=tenant_id, period=period, as_of=iso(f.as_of_ms), watermark=iso(f.watermark_ms), remaining=remaining, grants=grants
        )

    def _usage_of(self, d: _Document) -> TenantUsage:
        if d.usage is None:
            assert d.facts is not None
            try:
                d.usage = derive(self.watch.index, d.facts)
            except UnknownVersion as e:  # not kept: the next request tries again
                raise Unavailable(f"{e}; the catalog is reloaded every few seconds, ask again") from None
        return d.usage

    def _is_current(self, d: _Document) -> bool:
        """Whether `d` may be answered without asking Redis (the module's docstring says when)."""
        return not d.stale and self.live and d.epoch == self.epoch and time.monotonic() - d.verified < MAX_AGE_S

    async def _current(self, k: str) -> _Document:
        d = self._docs.get(k)
        if d is None or not self._is_current(d):
            d = await self._read(k)
        return d

    async def keep_fresh(self) -> None:
        """Until cancelled: every CONFIRM_S, confirm the versions of the documents answered
        since the last round (one round trip per CONFIRM_BATCH keys); a changed one is no
        longer current. Runs only while the subscription is live (else nothing is current)."""
        assert self.reader is not None
        while True:
            await asyncio.sleep(CONFIRM_S)  # the confirmation period, not a synchronisation
            if not self.live:
                continue
            used = [(k, d) for k, d in self._docs.items() if d.used]
            for i in range(0, len(used), CONFIRM_BATCH):
                part = used[i : i + CONFIRM_BATCH]
                epoch, sent = self.epoch, time.monotonic()
                try:
                    versions = await self.reader.versions([k for k, _ in part])
                except TRANSIENT:
                    break  # Redis away: the subscription goes too, and with it every document's currency
                for (_, d), version in zip(part, versions, strict=True):
                    d.used = False
                    if version > d.version:
                        if not d.stale:
                            self.unannounced += 1
                            UNANNOUNCED.inc()
                        d.stale = True
                    elif d.epoch == epoch:  # nothing newer in Redis (an older one: what was answered stays)
                        d.verified = sent

    async def _read(self, k: str) -> _Document:
        """The document of key `k` from Redis (one round trip), kept unless this process has
        already answered a newer version."""
        assert self.reader is not None
        epoch, sent = self.epoch, time.monotonic()
        reading = self._reading
        reading[k] = reading.get(k, 0) + 1
        try:
            raw, version = await self.reader.read(k)
        except TRANSIENT:
            raise ReadModelDown from None
        finally:
            n = reading.pop(k) - 1
            announced = self._announced.get(k, NO_DOCUMENT)
            if n:
                reading[k] = n
            else:
                self._announced.pop(k, None)
        self.reads += 1
        docs = self._docs
        d = docs.get(k)
        # Redis as new as what this process has (or older: it lost data, or answers from
        # behind): what it has stays, confirmed as the newest there is; newer: taken.
        if d is None or version > d.version:
            if d is not None:
                d.stale = True  # superseded (what still points to it must not answer from it)
            d = _Document(version, None if raw is None else USAGE_FACTS.decode(raw))
            if k not in docs and len(docs) >= MAX_DOCUMENTS:
                for old in list(docs)[: MAX_DOCUMENTS // 10]:
                    docs.pop(old).stale = True  # forgotten: no longer confirmed nor told about
            docs[k] = d
        d.epoch, d.verified, d.stale = epoch, sent, announced > d.version
        return d

    # -- the usage page ---------------------------------------------------------------------------

    def recent_periods(self, tenant_id: str, now_ms: int, n: int = PAGE_PERIODS) -> list[str]:
        """The tenant's last `n` billing periods up to now, newest first, from the catalog alone:
        the plan in force at each time says month or day, the contract bounds them."""
        ti = self.watch.index.tenants.get(tenant_id)
        if ti is None:
            raise NotFound(f"no tenant '{tenant_id}' in the catalog")
        t = now_ms if ti.until_ms is None else min(now_ms, ti.until_ms - 1)
        out: dict[str, None] = {}
        while len(out) < n and (ti.from_ms is None or t >= ti.from_ms):
            i = max(bisect.bisect_right(ti.change_ms, t) - 1, 0)
            p = period_of(t, ti.plans[i].billing_period)
            out[p.key] = None
            t = max(p.start_ms, ti.change_ms[i]) - 1  # a plan billed by another period may begin mid-period
        return list(out)

    async def periods(self, tenant_id: str) -> list[str]:
        """The recent periods with usage, newest first: exact keys named by the catalog, read
        in one round trip (no scan: its cost grows with every tenant's keys)."""
        assert self.reader is not None
        candidates = self.recent_periods(tenant_id, int(time.time() * 1000))
        try:
            return await self.reader.existing(tenant_id, candidates)
        except TRANSIENT:
            raise ReadModelDown from None
