"""The API process: Starlette on uvicorn, stateless (the broker is the only thing it writes,
Redis the only thing it reads).

Why Starlette + uvicorn: a small, well-kept ASGI toolkit with no opinions about bodies (we
decode with msgspec, as the dataflows do) and a production server that runs it in one
process per core; blocking work (the validator, waiting for the broker's acknowledgement)
runs in the thread pool, so the event loop keeps answering probes.

    POST /v1/events     application/cloudevents+json (one) or application/cloudevents-batch+json
                        (an array); scope `ingest`. 202 every event on the topic; 400 some
                        refused (per position, why; the first 100 listed) and the rest on the
                        topic; 401 no or unknown token; 403 scope, or an event for a tenant the
                        token does not serve (nothing sent); 408 body too slow; 413 body too
                        large; 415 content type; 429 over the client's events/s (Retry-After);
                        503 the broker did not acknowledge.
    GET /v1/tenants/{tenant}/usage?period=&meter=
                        the read model (usage, amount, levels) of one billing period; scope `read`.
    GET /v1/tenants/{tenant}/entitlements/{meter}?period=
                        has_access, included, used, remaining, overage; scope `read`.
    GET /tenants/{tenant}?period=
                        the same for people, as an HTML page (token as the Basic password).
    GET /healthz, /readyz, /metrics, /openapi.json

Queries read only Redis (the read model the rating dataflow writes) and the catalog file; a
Redis that does not answer is a 503 with Retry-After (and /readyz says so), never a 500. A
token bound to tenants (serving/auth.py) gets 403 for any other, before anything is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import time
import urllib.parse
from collections.abc import AsyncIterator
from html import escape as html_escape
from typing import Any

import msgspec
import redis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from operators.credits import check_grant
from operators.deadletters import clip
from operators.periods import iso
from operators.stats import Stats
from operators.status import status_of as invoice_status
from operators.status import verify
from runtime.settings import Settings, mask_url
from schemas.catalog import quantum
from schemas.events import GRANTED, VOIDED, GrantData
from schemas.outputs import ENCODER as OUTPUT_ENCODER
from schemas.outputs import StatusNotice
from schemas.usage import ENCODER as USAGE_ENCODER
from serving.auth import Client, Tokens
from serving.ingest import BrokerDown, Ingest, Judged, NotServed, catalog_watch
from serving.openapi import LISTED_REFUSALS, document
from serving.page import render
from serving.server import MULTIPROC_DIR, Bounds
from serving.usage import BadRequest, NotFound, Queries, Unavailable
from sinks.courier import parked
from state.read_model import ReadModelChanges, ReadModelReader
from state.review import Refused as ReviewRefused
from state.review import decide as decide_items
from state.review import load as load_review

EVENTS = Counter("tallyflow_api_events", "Events posted to the API, by outcome.", ["outcome"])
QUERIES = Counter("tallyflow_api_queries", "Usage queries answered, by kind.", ["kind"])
USAGES, PAGES = (QUERIES.labels(kind) for kind in ("usage", "page"))  # bound once: not per request
JSON_HEADERS = [(b"content-type", b"application/json")]
SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
RETRY_AFTER = {"Retry-After": "5"}
READY_CHECK_SECONDS = 5.0  # /readyz asks Redis (and the broker) at most this often
# The page is static HTML and CSS: no script, no frame, no form, nothing fetched.
HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


# The review page posts its own forms (and nothing else may): form-action 'self'.
REVIEW_HEADERS = {"Content-Security-Policy": HTML_HEADERS["Content-Security-Policy"].replace("form-action 'none'", "form-action 'self'")}


def review_html(items: list[Any], done: str | None) -> str:
    """The review desk's page: one row per held item, with its form."""
    rows = "".join(
        f"<tr><td><code>{html_escape(h.review_id)}</code></td><td>{html_escape(h.tenant_id)}</td><td>{html_escape(h.period or '')}</td>"
        f"<td>{html_escape(h.kind)}</td><td class=n>{html_escape(h.currency)} {h.amount:,}</td><td>{html_escape(h.reason)}</td>"
        f'<td><form method="post" action="/review/{urllib.parse.quote(h.review_id)}">'
        '<input name="why" required placeholder="why" aria-label="why">'
        '<button name="action" value="approve">Approve</button> <button name="action" value="reject">Reject</button></form></td></tr>'
        for h in items
    )
    note = f'<p class="done">{html_escape(done)}.</p>' if done else ""
    table = (
        "<table><thead><tr><th>review id</th><th>tenant</th><th>period</th><th>kind</th><th>amount</th><th>why held</th>"
        f"<th>decision</th></tr></thead><tbody>{rows}</tbody></table>"
        if items
        else "<p>Nothing waits for review.</p>"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Review before posting · Tallyflow</title>'
        "<style>body{font-family:system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}td,th{padding:.3rem .6rem;"
        "border-bottom:1px solid #dde2ea;text-align:left}.n{text-align:right}.done{color:#1b5e20}</style></head><body>"
        f"<h1>Review before posting</h1><p>{len(items)} item(s) wait; approved ones go to the ERP, rejected ones to the "
        f"exceptions topic, and every decision is kept with who, when and why.</p>{note}{table}</body></html>"
    )


class _Tally:
    """Entitlement checks answered: a plain count on the hot path, added to the Prometheus
    counter once a second and before each scrape (a Prometheus increment takes a lock; a
    check costs a few microseconds in all)."""

    def __init__(self) -> None:
        self.n = 0
        self.counter = QUERIES.labels("entitlement")

    def flush(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.counter.inc(n)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)  # how often the count is published, not a synchronisation
            self.flush()


class _Bucket:
    """Events per second per client, with a one-second burst. A request takes as many tokens
    as it has events and may leave the bucket in debt (so a batch larger than a second's
    worth is admitted once the bucket is full, and the next waits until the debt is paid)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.stamp = rate, rate, time.monotonic()

    def take(self, n: int) -> float:
        """0 if allowed (and taken); else the seconds until it would be."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(n, self.rate)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate


def _authorization(scope: Scope) -> str | None:
    """The Authorization header (what `request.headers` finds, without building its index)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


@functools.lru_cache(maxsize=4096)
def _query(raw: bytes) -> QueryParams:
    """Query parameters, parsed once per distinct query string (checks repeat theirs)."""
    return QueryParams(raw)


def _registry() -> CollectorRegistry:
    """What /metrics shows: this process's metrics, or with several workers (serving/server.py)
    every worker's, summed, whichever serves the scrape."""
    if MULTIPROC_DIR not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _error(status: int, message: str, headers: dict[str, str] | None = None, **more: object) -> Response:
    return Response(msgspec.json.encode({"error": message, **more}), status, media_type="application/json", headers=headers)


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status, headers={**HTML_HEADERS, **(headers or {})})


class _RedisCheck:
    """Whether Redis answers, asked at most every READY_CHECK_SECONDS and within 2.5 s, so
    probes arriving together share one ping and none waits longer than that."""

    def __init__(self, reader: ReadModelReader, url: str) -> None:
        self.reader, self.url = reader, mask_url(url)
        self.checked_at = -1e9
        self.problem: str | None = None
        self.lock = asyncio.Lock()

    async def __call__(self) -> str | None:
        async with self.lock:
            if time.monotonic() - self.checked_at > READY_CHECK_SECONDS:
                try:
                    await asyncio.wait_for(self.reader.ping(), 2.5)
                    self.problem = None
                except (redis.RedisError, TimeoutError) as e:
                    self.problem = f"Redis at {self.url} does not answer ({e or type(e).__name__}); usage queries answer 503"
                self.checked_at = time.monotonic()
            return self.problem


def build_app(s: Settings, ingest: Ingest | None = None, bounds: Bounds | None = None) -> ASGIApp:
    """The API: the Starlette app below, behind the entitlement check's own path (`checks`)."""
    bounds = bounds or Bounds.of(s.api)
    tokens = Tokens.load(s.api.tokens_file)
    buckets: dict[str, _Bucket] = {}
    state: dict[str, Ingest] = {}
    watch = ingest.watch if ingest else catalog_watch(s, Stats())  # a bad catalog stops start-up here
    reader = ReadModelReader(s.stores)
    queries = Queries(watch, reader)
    changes = ReadModelChanges(s.stores, queries.changed, queries.set_live)  # run by the lifespan: answers are kept until changed
    redis_problem = _RedisCheck(reader, s.stores.redis_url)
    tally = _Tally()

    def the_ingest() -> Ingest:
        if "ingest" not in state:
            state["ingest"] = ingest or Ingest(s, watch)
        return state["ingest"]

    def authorize(request: Request, scope: str, tenant: str | None = None, html: bool = False) -> Client | Response:
        """The client, or the answer refusing it: before anything is looked up, so a token
        bound to tenants learns nothing about others (not even whether they exist)."""
        client = tokens.client(_authorization(request.scope))
        if client is None:
            if html:  # a browser asks its user for the token (as the password)
                return _html("<p>A token with the read scope is needed.</p>", 401, headers={"WWW-Authenticate": 'Basic realm="Tallyflow"'})
            return Response(
                b'{"error":"a bearer token is required"}', 401, media_type="application/json", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope not in client.scopes:
            why = f"this token lacks the {scope} scope"
        elif tenant is not None and not client.serves(tenant):
            why = f"this token does not serve tenant '{clip(tenant)}'"
        else:
            return client
        return _html(f"<p>{html_escape(why)}.</p>", 403) if html else _error(403, why)

    def status_of(e: Exception) -> int:
        return 404 if isinstance(e, NotFound) else 503 if isinstance(e, Unavailable) else 400

    def refused(e: Exception) -> Response:
        status = status_of(e)
        return _error(status, str(e), headers=RETRY_AFTER if status == 503 else None)

    async def get_usage(request: Request) -> Response:
        client = authorize(request, "read", request.path_params["tenant"])
        if isinstance(client, Response):
            return client
        try:
            body = await queries.usage_json(
                request.path_params["tenant"], request.query_params.get("period"), request.query_params.get("meter")
            )
        except (NotFound, BadRequest, Unavailable) as e:
            return refused(e)
        USAGES.inc()
        return Response(body, media_type="application/json")

    async def get_entitlement(request: Request) -> Response:
        """The hot path (products ask it on every request they serve): the answer is encoded
        once per version of the tenant's document, and asks Redis nothing while it is current
        (serving/usage.py)."""
        p = request.path_params
        client = authorize(request, "read", p["tenant"])
        if isinstance(client, Response):
            return client
        try:
            body = await queries.entitlement_json(p["tenant"], p["meter"], _query(request.scope["query_string"]).get("period"))
        except (NotFound, BadRequest, Unavailable) as e:
            return refused(e)
        tally.n += 1
        return Response(body, media_type="application/json")

    async def usage_page(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        client = authorize(request, "read", tenant, html=True)
        if isinstance(client, Response):
            return client
        try:
            usage = await queries.usage(tenant, request.query_params.get("period"))
            periods = await queries.periods(tenant)
        except Unavailable as e:  # JSON with Retry-After, as on every route: a 503 is for machines too
            return refused(e)
        except (NotFound, BadRequest) as e:
            return _html(f"<p>{html_escape(str(e))}</p>", status_of(e))
        if usage.period not in periods:
            periods = sorted([*periods, usage.period], reverse=True)
        PAGES.inc()
        return _html(render(usage, watch.index, periods, tz=request.query_params.get("tz")))

    async def post_events(request: Request) -> Response:
        client = authorize(request, "ingest")
        if isinstance(client, Response):
            return client
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (SINGLE, BATCH, "application/json"):
            return _error(415, f"send {SINGLE} (one event) or {BATCH} (an array)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > s.api.max_body_bytes:
            return _error(413, f"the body is over {s.api.max_body_bytes} bytes; send smaller batches")
        body = b""
        try:
            async with asyncio.timeout(bounds.body_seconds):  # a slow client holds a request no longer
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > s.api.max_body_bytes:
                        return _error(413, f"the body is over {s.api.max_body_bytes} bytes; send smaller batches")
        except TimeoutError:
            return _error(408, f"the body did not arrive within {bounds.body_seconds:g} s", headers={"Connection": "close"})
        batch = ctype == BATCH or (ctype == "application/json" and body.lstrip()[:1] == b"[")
        ing = the_ingest()
        parts = await run_in_threadpool(ing.split, body, batch)  # a deeply nested batch takes a structure scan
        n = len(parts) if isinstance(parts, list) else 1
        bucket = buckets.setdefault(client.name, _Bucket(client.rate_per_second or s.api.events_per_second))
        wait = bucket.take(n)
        if wait:
            EVENTS.labels("throttled").inc(n)
            return Response(
                msgspec.json.encode({"error": f"over {bucket.rate:g} events/s for this client; retry after the given seconds"}),
                429,
                media_type="application/json",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        try:
            judged = (
                parts if isinstance(parts, Judged) else await run_in_threadpool(ing.judge, parts, client.serves if client.bound else None)
            )
        except NotServed as e:
            EVENTS.labels("forbidden").inc(n)
            return _error(403, str(e), index=e.index)
        if "credits:write" not in client.scopes and any(a.pricing_version == "" for a in judged.accepted):  # a grant or a void
            EVENTS.labels("forbidden").inc(n)
            first = min(a.offset for a in judged.accepted if a.pricing_version == "")
            return _error(403, "granting or voiding credits needs the credits:write scope; nothing was sent", index=first)
        try:
            await ing.produce(judged.accepted)
        except BrokerDown as e:
            EVENTS.labels("unavailable").inc(n)
            return _error(
                503, f"the broker did not acknowledge the events ({e}); nothing is promised, send them again", headers={"Retry-After": "5"}
            )
        EVENTS.labels("accepted").inc(len(judged.accepted))
        EVENTS.labels("refused").inc(len(judged.refused))
        accepted = sorted(a.offset for a in judged.accepted)
        # Listed refusals are capped (a batch of 200,000 bad events would answer megabytes);
        # every position not in accepted_indexes was refused.
        listed = sorted(judged.refused.items())[:LISTED_REFUSALS]
        refused = [{"index": i, "reason": r, "message": m} for i, (r, m) in listed]
        body_out = {"accepted": len(accepted), "accepted_indexes": accepted, "refused": refused, "refused_count": len(judged.refused)}
        return Response(msgspec.json.encode(body_out), 400 if refused else 202, media_type="application/json")

    async def get_credits(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        client = authorize(request, "read", tenant)
        if isinstance(client, Response):
            return client
        try:
            credits = await queries.credits(tenant, request.query_params.get("period"))
        except (NotFound, BadRequest, Unavailable) as e:
            return refused(e)
        QUERIES.labels("credits").inc()
        return Response(USAGE_ENCODER.encode(credits), media_type="application/json")

    async def credit_event(request: Request, kind: str) -> Response:
        """A grant (the body: the grant's data, SPEC §9.5) or a void (no body) of the path's
        tenant, as the CloudEvent the rating dataflow reads, judged as the dataflow judges it
        and produced keyed by the tenant: 202 once the broker acknowledged it. Its id follows
        from the grant id, so a POST retried after a lost answer is the same event again (a
        duplicate, dropped), and so is a second grant under an id already used."""
        tenant = request.path_params["tenant"]
        client = authorize(request, "credits:write", tenant)
        if isinstance(client, Response):
            return client
        if kind == GRANTED:
            try:
                async with asyncio.timeout(bounds.body_seconds):
                    body = await request.body()
            except TimeoutError:
                return _error(408, f"the body did not arrive within {bounds.body_seconds:g} s", headers={"Connection": "close"})
            if len(body) > s.api.max_body_bytes:
                return _error(413, f"the body is over {s.api.max_body_bytes} bytes")
            try:
                grant = msgspec.json.decode(body, type=GrantData)
            except msgspec.DecodeError as e:
                return _error(400, f"bad_grant: {e}", reason="bad_grant")
            why = check_grant(grant, quantum(grant.currency), {m.slug for m in watch.index.catalog.meters})
            if why is not None:
                return _error(400, f"bad_grant: grant '{grant.grant_id}': {why}", reason="bad_grant")
            grant_id, data = grant.grant_id, msgspec.json.decode(body)
        else:
            grant_id = request.path_params["grant_id"]
            data = {"grant_id": grant_id}
        event = {
            "specversion": "1.0",
            "id": f"{'grant' if kind == GRANTED else 'void'}:{grant_id}",
            "source": "tallyflow/api",
            "type": kind,
            "subject": tenant,
            "time": iso(int(time.time() * 1000)),
            "datacontenttype": "application/json",
            "data": data,
        }
        ing = the_ingest()
        judged = await run_in_threadpool(ing.judge, [msgspec.json.encode(event)])
        if judged.refused:
            reason, message = judged.refused[0]
            return _error(400, f"{reason}: {message}", reason=reason)
        try:
            await ing.produce(judged.accepted)
        except BrokerDown as e:
            return _error(503, f"the broker did not acknowledge the event ({e}); send it again", headers={"Retry-After": "5"})
        EVENTS.labels("accepted").inc()
        return JSONResponse({"grant_id": grant_id, "event_id": event["id"], "type": kind}, 202)

    async def post_grant(request: Request) -> Response:
        return await credit_event(request, GRANTED)

    async def post_void(request: Request) -> Response:
        return await credit_event(request, VOIDED)

    async def erp_status(request: Request) -> Response:
        """An ERP's webhook (SPEC §10.3): an invoice state, signed per Standard Webhooks with
        TALLYFLOW_ERP_WEBHOOK_SECRET, to `erp.status` keyed by tenant (202 after the broker's
        ack). A notice for a customer the catalog does not know is parked on the exceptions
        topic with its reason, and answered 202 too: sending it again would not help."""
        secret = s.erp.webhook_secret
        if not secret:
            return _error(404, "no ERP webhook is configured here; set TALLYFLOW_ERP_WEBHOOK_SECRET")
        try:
            async with asyncio.timeout(bounds.body_seconds):
                body = await request.body()
        except TimeoutError:
            return _error(408, f"the body did not arrive within {bounds.body_seconds:g} s", headers={"Connection": "close"})
        h = request.headers
        why = verify(secret, h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature"), body)
        if why:
            return _error(401, f"the webhook is not signed right: {why}")
        try:
            notice = msgspec.json.decode(body, type=StatusNotice)
        except msgspec.DecodeError as e:
            return _error(400, f"not an invoice status: {e}")
        watch.poll()
        told = invoice_status(watch.index, notice)
        ing = the_ingest()
        try:
            if isinstance(told, str):
                record = parked(
                    "erp-status", h.get("webhook-id") or "", [msgspec.json.decode(body)], [notice.invoice_id], {notice.invoice_id: told}
                )
                await ing.send([(s.topics.exceptions, b"erp-status", record)])
                return JSONResponse({"parked": told}, 202)
            await ing.send([(s.topics.status, told.tenant_id.encode(), OUTPUT_ENCODER.encode(told))])
        except BrokerDown as e:
            return _error(503, f"the broker did not acknowledge the status ({e}); send it again", headers={"Retry-After": "5"})
        return JSONResponse({"status_id": told.status_id, "tenant_id": told.tenant_id}, 202)

    def reviewer(request: Request, html: bool = False) -> Client | Response:
        """The review desk is the finance team's, over every tenant: a token bound to tenants is refused."""
        client = authorize(request, "review:write", html=html)
        if isinstance(client, Response):
            return client
        if client.bound:
            why = "the review desk spans every tenant: use a token not bound to tenants, with review:write"
            return _html(f"<p>{html_escape(why)}.</p>", 403) if html else _error(403, why)
        return client

    async def review_page(request: Request) -> Response:
        """The desk for people (HTML, no script): what waits, each with a form to approve or
        reject it with why; the decision is the token's client's (HTTP Basic, as the page)."""
        client = reviewer(request, html=True)
        if isinstance(client, Response):
            return client
        desk = await run_in_threadpool(load_review, s)
        items = desk.pending(request.query_params.get("tenant"))
        return _html(review_html(items, request.query_params.get("done")), headers=REVIEW_HEADERS)

    async def review_form(request: Request) -> Response:
        """A decision from the page's form; back to the page (303) once it is on usage.audit.
        Only from the page itself: a browser sends Basic credentials to any site's form, so a
        request another site's page made (Sec-Fetch-Site, or an Origin of another host) is refused."""
        client = reviewer(request, html=True)
        if isinstance(client, Response):
            return client
        site, origin = request.headers.get("sec-fetch-site"), request.headers.get("origin")
        host = request.headers.get("host", "")
        if site not in (None, "same-origin", "none") or (origin is not None and origin.split("://", 1)[-1] != host):
            return _html("<p>Decide from the review page itself.</p>", 403)
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        action, why = (form.get("action") or [""])[0], (form.get("why") or [""])[0]
        if action not in ("approve", "reject"):
            return _html("<p>Approve or reject.</p>", 400)
        desk = await run_in_threadpool(load_review, s)
        review_id = request.path_params["review_id"]
        try:
            await run_in_threadpool(decide_items, s, desk, action, [review_id], None, client.name, why)
        except ReviewRefused as e:
            return _html(f'<p>{html_escape(str(e))}</p><p><a href="/review">Back to the review desk</a></p>', 409 if e.code == 1 else 400)
        return Response(status_code=303, headers={"Location": "/review?" + urllib.parse.urlencode({"done": f"{action}d {review_id}"})})

    async def get_review(request: Request) -> Response:
        """What waits for a person before the ERP (SPEC §10.1), oldest first per tenant."""
        client = reviewer(request)
        if isinstance(client, Response):
            return client
        desk = await run_in_threadpool(load_review, s)
        items = desk.pending(request.query_params.get("tenant"))
        return Response(OUTPUT_ENCODER.encode({"pending": items, "count": len(items)}), media_type="application/json")

    async def decide_review(request: Request) -> Response:
        """A decision on one held item, by the token's client (who), with `{"why": ...}`: an
        audit record on usage.audit, after the broker's ack. Unknown: 404; decided: 409."""
        client = reviewer(request)
        if isinstance(client, Response):
            return client
        action = request.path_params["action"]
        if action not in ("approve", "reject"):
            return _error(404, "approve or reject")
        try:
            why = str(msgspec.json.decode(await request.body(), type=dict[str, str]).get("why", ""))
        except msgspec.DecodeError:
            return _error(400, 'send {"why": "..."}: the audit record keeps why')
        desk = await run_in_threadpool(load_review, s)
        try:
            done = await run_in_threadpool(decide_items, s, desk, action, [request.path_params["review_id"]], None, client.name, why)
        except ReviewRefused as e:
            status = 409 if e.code == 1 else (404 if "no held item" in str(e) else 400)
            return _error(status, str(e))
        (d,) = done
        return JSONResponse({"review_id": d.review_id, "decision": d.decision, "by": d.by, "at": d.at, "audit_id": d.audit_id})

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        """Not ready while the broker or Redis does not answer: a load balancer sends requests
        elsewhere. Each check is cached and bounded (a few seconds at most), so probes never hang."""
        problems = [p for p in await asyncio.gather(run_in_threadpool(the_ingest().broker_problem), redis_problem()) if p]
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, 503)
        return JSONResponse({"status": "ready"})

    async def metrics(_: Request) -> Response:
        tally.flush()
        return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(changes.run(), name="read-model-changes"),
            asyncio.create_task(queries.keep_fresh(), name="confirm"),
            asyncio.create_task(tally.run(), name="tally"),
        ]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if "ingest" in state:  # what the broker has not acknowledged yet, before exiting
            await run_in_threadpool(state["ingest"].close)
        await reader.close()

    async def openapi(_: Request) -> Response:
        return Response(msgspec.json.encode(document()), media_type="application/json")

    async def internal(_: Request, e: Exception) -> Response:
        """A bug answers JSON without a traceback (Starlette logs it after)."""
        return _error(500, "internal error; it is logged on the server")

    app = Starlette(
        routes=[
            Route("/v1/tenants/{tenant}/entitlements/{meter}", get_entitlement),  # first: the route asked most, matched first
            Route("/v1/events", post_events, methods=["POST"]),
            Route("/v1/erp/status", erp_status, methods=["POST"]),
            Route("/v1/review", get_review),
            Route("/review", review_page),
            Route("/review/{review_id}", review_form, methods=["POST"]),
            Route("/v1/review/{review_id}/{action}", decide_review, methods=["POST"]),
            Route("/v1/tenants/{tenant}/usage", get_usage),
            Route("/v1/tenants/{tenant}/credits", get_credits),
            Route("/v1/tenants/{tenant}/grants", post_grant, methods=["POST"]),
            Route("/v1/tenants/{tenant}/grants/{grant_id}/void", post_void, methods=["POST"]),
            Route("/tenants/{tenant}", usage_page),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
        ],
        lifespan=lifespan,
        exception_handlers={Exception: internal},
    )

    async def answered(scope: Scope, tenant: str, meter: str) -> bytes | None:
        """The check's answer when everything goes well; None when the route must answer
        (no token, a refusal, a 4xx or 503, a bug): it does the same again and says why."""
        client = tokens.client(_authorization(scope))
        if client is None or "read" not in client.scopes or not client.serves(tenant):
            return None
        try:
            return await queries.entitlement_json(tenant, meter, _query(scope["query_string"]).get("period"))
        except Exception:
            return None

    async def checks(scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/tenants/{tenant}/entitlements/{meter} answered here, without the framework
        (its routing, request and response objects and middleware cost more than the check
        itself); everything else, and every answer but a 200, by the Starlette app."""
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            parts = scope["path"].split("/")
            if len(parts) == 6 and parts[2] == "tenants" and parts[4] == "entitlements" and parts[1] == "v1" and parts[3] and parts[5]:
                body = await answered(scope, parts[3], parts[5])
                if body is not None:
                    tally.n += 1
                    headers = [*JSON_HEADERS, (b"content-length", b"%d" % len(body))]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
        await app(scope, receive, send)

    return checks
