"""Usage and entitlement queries: the read model in Redis (written by the rating dataflow),
read through the catalog for what it does not hold (a tenant's plan, the current period,
a meter's included quantity before its first event). Nothing here writes anywhere, and no
request scans Redis: every key read is named exactly, from the catalog.
"""

from __future__ import annotations

import bisect
import re
import time
from datetime import UTC, datetime

import msgspec

from operators.catalog_index import PlanIndex
from operators.periods import Period, iso, period_of
from operators.usage import ZERO, UnknownVersion, derive, empty_usage, entitlement, plan_in_force
from runtime.catalog_watch import CatalogWatch
from runtime.redis import TRANSIENT
from schemas.usage import USAGE_FACTS, Entitlement, TenantUsage
from state.read_model import ReadModelReader

_FORMATS = {
    "month": (re.compile(r"^\d{4}-\d{2}$"), "%Y-%m", "YYYY-MM"),
    "day": (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "%Y-%m-%d", "YYYY-MM-DD"),
}


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


class Queries:
    def __init__(self, watch: CatalogWatch, reader: ReadModelReader) -> None:
        self.watch, self.reader = watch, reader

    def _plan(self, tenant_id: str, at_ms: int) -> PlanIndex:
        cat = self.watch.index
        ti = cat.tenants.get(tenant_id)
        if ti is None:
            raise NotFound(f"no tenant '{tenant_id}' in the catalog")
        return plan_in_force(cat, tenant_id, at_ms) or ti.plans[-1]  # before or after its contract: its nearest plan

    def period(self, tenant_id: str, key: str | None, now_ms: int) -> tuple[Period, PlanIndex]:
        """The period asked for (default: the current one) and the plan in force for it."""
        plan = self._plan(tenant_id, now_ms)
        kind = plan.billing_period
        if key is None:
            return period_of(now_ms, kind), plan
        pattern, fmt, shape = _FORMATS[kind]
        try:
            if not pattern.match(key):
                raise ValueError
            start = datetime.strptime(key, fmt).replace(tzinfo=UTC)
        except ValueError:
            raise BadRequest(f"period: '{key}' is not a billing period of this tenant; use {shape}") from None
        p = period_of(int(start.timestamp() * 1000), kind)
        return p, self._plan(tenant_id, max(p.start_ms, min(now_ms, p.end_ms - 1)))

    async def usage(self, tenant_id: str, key: str | None, meter: str | None = None) -> TenantUsage:
        """The read model's figures, or zeros from the catalog for a period without usage."""
        self.watch.poll()
        now_ms = int(time.time() * 1000)
        p, plan = self.period(tenant_id, key, now_ms)
        raw = await self._get(tenant_id, p.key)
        doc = self._derive(raw) if raw is not None else empty_usage(self.watch.index, tenant_id, plan, p, now_ms)
        if meter is not None:
            if meter not in doc.meters and meter not in plan.meters:
                raise NotFound(f"meter '{meter}' is not in plan {plan.pricing_version} of tenant '{tenant_id}' nor in its usage")
            if meter not in doc.meters:
                doc = msgspec.structs.replace(doc, meters=empty_usage(self.watch.index, tenant_id, plan, p, now_ms).meters)
            doc.meters = {meter: doc.meters[meter]}
        return doc

    async def entitlement(self, tenant_id: str, meter: str, key: str | None) -> Entitlement:
        """Measured under the pricing version in force (after a plan change: the usage rated
        under it, the quantity its `included` applies to)."""
        self.watch.poll()
        now_ms = int(time.time() * 1000)
        p, plan = self.period(tenant_id, key, now_ms)
        pmi = plan.meters.get(meter)
        if pmi is None:
            raise NotFound(f"meter '{meter}' is not in plan {plan.pricing_version} of tenant '{tenant_id}'")
        raw = await self._get(tenant_id, p.key)
        if raw is None:
            return entitlement(tenant_id, p.key, pmi, plan.pricing_version, ZERO, iso(now_ms), None)
        doc = self._derive(raw)
        m = doc.meters.get(meter)
        used = next((v.quantity for v in m.versions if v.pricing_version == plan.pricing_version), ZERO) if m else ZERO
        return entitlement(tenant_id, p.key, pmi, plan.pricing_version, used, doc.as_of, doc.watermark)

    def _derive(self, raw: bytes) -> TenantUsage:
        try:
            return derive(self.watch.index, USAGE_FACTS.decode(raw))
        except UnknownVersion as e:
            raise Unavailable(f"{e}; the catalog is reloaded every few seconds, ask again") from None

    async def _get(self, tenant_id: str, period: str) -> bytes | None:
        try:
            return await self.reader.get(tenant_id, period)
        except TRANSIENT:
            raise ReadModelDown from None

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
        candidates = self.recent_periods(tenant_id, int(time.time() * 1000))
        try:
            return await self.reader.existing(tenant_id, candidates)
        except TRANSIENT:
            raise ReadModelDown from None
