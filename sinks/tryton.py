"""Tryton as the ERP and the CRM, over its JSON-RPC, with the Tallyflow Tryton module (./tryton).

Tryton has no idempotency keys and a duplicate `create` is a second row, so effectively-once
is enforced inside Tryton: the module's `tallyflow.usage` records carry the line id under a
UNIQUE constraint and `ingest` answers each line `created`, `existing` or `rejected: why` in
one transaction; its `tallyflow.credit` records do the same for the credit ledger's records
by record id. A batch re-sent after a crash between Tryton's commit and our ledger write
comes back `existing`, never a second record. Alerts become leads (`sale.opportunity`) unique
by alert id the same way. Amounts go as the exact decimal strings Tallyflow rated; Tryton
stores them and never re-prices.

Wire format (POST {tryton_url}/{database}/rpc/):
    {"id": n, "method": "model.tallyflow.usage.ingest", "params": [[line, ...], context]}
    200 {"id": n, "result": {...}}  |  200 {"id": n, "error": [kind, args]}
The context (the user's company, from `res.user.get_preferences`) is the last parameter of
every call: without it some of Tryton's code silently does nothing. A session from
`common.db.login` goes in `Authorization: Session base64(login:uid:session)`; a 401 (expired
session) is answered before the method runs, so logging in again and re-sending is safe.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import httpx
import msgspec

from runtime.catalog_watch import file_stamp
from runtime.settings import TrytonSettings
from schemas.catalog import CatalogError, load_catalog
from schemas.outputs import CreditRecord, InvoiceStatus, RatedUsageLine, ThresholdAlert
from sinks.base import Answer
from sinks.erp import CREDITS


class TrytonError(Exception):
    """Tryton did not do what was asked; `status` is the HTTP status or the error kind."""

    def __init__(self, message: str, *, status: int | str) -> None:
        super().__init__(message)
        self.status = status


_DT_FIELDS = ("year", "month", "day", "hour", "minute", "second", "microsecond")


def _default(obj: object) -> Any:
    if isinstance(obj, Decimal):
        return {"__class__": "Decimal", "decimal": str(obj)}
    if isinstance(obj, dt.datetime):
        return {"__class__": "datetime", **{k: getattr(obj, k) for k in _DT_FIELDS}}
    if isinstance(obj, dt.date):
        return {"__class__": "date", "year": obj.year, "month": obj.month, "day": obj.day}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _object_hook(obj: dict[str, Any]) -> Any:
    kind = obj.get("__class__")
    if kind == "Decimal":
        return Decimal(obj["decimal"])
    if kind == "date":
        return dt.date(obj["year"], obj["month"], obj["day"])
    if kind == "datetime":
        return dt.datetime(obj["year"], obj["month"], obj["day"], obj["hour"], obj["minute"], obj["second"], obj["microsecond"])
    return obj


class TrytonClient:
    """A JSON-RPC session with the user's context; logs in lazily and again after a 401."""

    def __init__(self, cfg: TrytonSettings, *, timeout_s: float | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.cfg = cfg
        self.path = f"/{cfg.database}/rpc/"
        self.http = httpx.Client(base_url=cfg.url, timeout=timeout_s or cfg.timeout_seconds, transport=transport)
        self.context: dict[str, Any] | None = None
        self._n = 0

    def call(self, method: str, *args: Any) -> Any:
        if self.context is None:
            self.login()
        try:
            return self._post(method, [*args, self.context])
        except TrytonError as e:
            if e.status != 401:
                raise
            self.login()
            return self._post(method, [*args, self.context])

    def login(self) -> None:
        self.http.headers.pop("Authorization", None)
        uid, session, _bus = self._post("common.db.login", [self.cfg.user, {"password": self.cfg.password}, "en"])
        token = base64.b64encode(f"{self.cfg.user}:{uid}:{session}".encode()).decode()
        self.http.headers["Authorization"] = f"Session {token}"
        self.context = self._post("model.res.user.get_preferences", [True, {}])

    def _post(self, method: str, params: list[Any]) -> Any:
        self._n += 1
        body = json.dumps({"id": self._n, "method": method, "params": params}, default=_default)
        try:
            r = self.http.post(self.path, content=body, headers={"Content-Type": "application/json"})
        except httpx.TransportError as e:  # down or timed out: nothing decided (a late commit is found "existing")
            raise TrytonError(f"{method}: {type(e).__name__}: {e}", status=type(e).__name__) from e
        if r.status_code != 200:
            # 401 session, 429 too many logins, 503 lock or database busy: all transient; 403/404
            # (module or database missing) need a person, but holding the backlog loses nothing.
            raise TrytonError(f"{method}: HTTP {r.status_code}: {r.text[:500]}", status=r.status_code)
        doc = json.loads(r.content, object_hook=_object_hook)
        if doc.get("error") is None:
            return doc.get("result")
        kind, args = doc["error"][0], doc["error"][1]
        if isinstance(args, list):  # a Tryton exception: [kind, [message, description, ...]]
            text = " ".join(str(a) for a in (args[1:3] if kind == "UserWarning" else args[:2]) if a)
            raise TrytonError(f"{method}: {kind}: {text}", status=str(kind))
        raise TrytonError(f"{method}: server error: {kind}", status="server_error")

    def close(self) -> None:
        self.http.close()


def _answer(ids: Sequence[str], outcomes: dict[str, str]) -> Answer:
    """Per item: created/existing = accepted; `rejected: why` = for good; missing = a bug there."""
    missing = [i for i in ids if i not in outcomes]
    if missing:
        return Answer.later("incomplete", f"Tryton answered no outcome for {missing[:5]}")
    rejected = {k: o.removeprefix("rejected: ") for k, i in enumerate(ids) if (o := outcomes[i]).startswith("rejected")}
    created = sum(1 for o in outcomes.values() if o == "created")
    return Answer(rejected=rejected, status="ok", detail=f"{created} created, {len(ids) - created - len(rejected)} existing")


ERP_COMPANY = "erp_company"  # the item's key the module books it under (tryton/tallyflow_tryton/common.py)


class EntityCompanies:
    """Each legal entity's ERP company (SPEC §10.2), from the catalog file: the Tryton module
    books an item under the company whose party has that code (or name). The file is read
    again when it changed (looked at, at most, every RELOAD_S), like the dataflows' catalog:
    an entity added, or its company corrected, reaches this process without a restart."""

    RELOAD_S = 5.0

    def __init__(self, catalog_path: str) -> None:
        self.path = catalog_path
        self._stamp = file_stamp(self.path)
        self._companies = self._load()
        self._looked = time.monotonic()

    def _load(self) -> dict[str, str]:
        return {e.id: e.erp_company for e in load_catalog(self.path).entities}

    def __call__(self, entity: str) -> str | None:
        if time.monotonic() - self._looked >= self.RELOAD_S:
            self._looked = time.monotonic()
            stamp = file_stamp(self.path)
            if stamp != self._stamp:
                with contextlib.suppress(CatalogError):  # a catalog being edited: the last good one stands
                    self._companies = self._load()
                    self._stamp = stamp
        return self._companies.get(entity)


class _TrytonDestination:
    def __init__(
        self,
        cfg: TrytonSettings,
        timeout_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
        companies: EntityCompanies | None = None,
    ) -> None:
        self.client = TrytonClient(cfg, timeout_s=timeout_s, transport=transport)
        self.companies = companies

    def _ingest(self, method: str, ids: list[str], items: Sequence[Any]) -> Answer:
        payload: list[dict[str, Any]] = msgspec.to_builtins(items)
        unknown = self._name_companies(payload)
        send = [k for k in range(len(ids)) if k not in unknown]
        if not send:
            return Answer(rejected=unknown, status="unknown_entity", detail=next(iter(unknown.values()), ""))
        try:
            outcomes = self.client.call(method, [payload[k] for k in send])
        except TrytonError as e:
            # Tryton down or busy, or the whole call refused (no company, module missing): no item
            # was decided; the backlog waits in Kafka until it works, which loses nothing.
            return Answer.later(e.status, str(e))
        if not isinstance(outcomes, dict):
            return Answer.later("unexpected", f"{method} answered {str(outcomes)[:200]}")
        answer = _answer([ids[k] for k in send], outcomes)
        if not unknown or answer.retry:
            return answer
        rejected = {**{send[i]: why for i, why in answer.rejected.items()}, **unknown}
        return Answer(rejected=rejected, status=answer.status, detail=answer.detail)

    def _name_companies(self, payload: list[dict[str, Any]]) -> dict[int, str]:
        """Each item of a legal entity gets its ERP company; those whose entity the catalog
        does not declare are rejected (parked with why; replayed once it does)."""
        unknown: dict[int, str] = {}
        if self.companies is None:
            return unknown
        for k, item in enumerate(payload):
            entity = item.get("legal_entity")
            if entity is None:
                continue
            company = self.companies(entity)
            if company is None:
                unknown[k] = (
                    f"legal entity {entity} is not declared in the catalog {self.companies.path}: "
                    "add it under entities: with its erp_company"
                )
            else:
                item[ERP_COMPANY] = company
        return unknown

    def close(self) -> None:
        self.client.close()


class TrytonErp(_TrytonDestination):
    """Rated lines (corrections too: their signed deltas) become `tallyflow.usage` records
    for the party whose code is the line's `erp_customer_id`, one call per micro-batch."""

    name = "erp"

    def send(self, key: str, items: Sequence[RatedUsageLine]) -> Answer:
        return self._ingest("model.tallyflow.usage.ingest", [ln.line_id for ln in items], items)


class TrytonErpCredits(_TrytonDestination):
    """Credit ledger records (granted, drawn, returned, expired, voided) become
    `tallyflow.credit` records for the party of their `erp_customer_id`, once per record id;
    the period's invoice takes its drawn less returned as one negative line per grant."""

    name = CREDITS

    def send(self, key: str, items: Sequence[CreditRecord]) -> Answer:
        return self._ingest("model.tallyflow.credit.ingest", [r.record_id for r in items], items)


class TrytonCrm(_TrytonDestination):
    """A threshold alert becomes a lead for the party of its `crm_account_id`, once per alert id."""

    name = "crm"
    max_in_flight = 1  # one session whose re-login is not shared safely, and Tryton on SQLite serialises writers

    def send(self, key: str, items: Sequence[ThresholdAlert]) -> Answer:
        return self._ingest("model.sale.opportunity.tallyflow_ingest", [a.alert_id for a in items], items)


class TrytonCrmStatus(_TrytonDestination):
    """An invoice state becomes a `tallyflow.billing_status` record for the party of its
    `crm_account_id`, once per status id, and the party shows its newest billing status."""

    name = "crm-status"

    def send(self, key: str, items: Sequence[InvoiceStatus]) -> Answer:
        return self._ingest("model.tallyflow.billing_status.ingest", [st.status_id for st in items], items)
