"""The API process: Starlette on uvicorn, stateless (the broker is the only thing it writes,
Redis the only thing it reads).

Why Starlette + uvicorn: a small, well-kept ASGI toolkit with no opinions about bodies (we
decode with msgspec, as the dataflows do) and a production server that runs it in one
process per core; blocking work (the validator, waiting for the broker's acknowledgement)
runs in the thread pool, so the event loop keeps answering probes.

    POST /v1/events     application/cloudevents+json (one) or application/cloudevents-batch+json
                        (an array); scope `ingest`. 202 every event on the topic; 400 some
                        refused (per position, why) and the rest on the topic; 401 no or unknown
                        token; 403 scope; 413 body too large; 415 content type; 429 over the
                        client's events/s (Retry-After); 503 the broker did not acknowledge.
    GET /v1/tenants/{tenant}/usage?period=&meter=
                        the read model (usage, amount, levels) of one billing period; scope `read`.
    GET /v1/tenants/{tenant}/entitlements/{meter}?period=
                        has_access, included, used, remaining, overage; scope `read`.
    GET /tenants/{tenant}?period=
                        the same for people, as an HTML page (token as the Basic password).
    GET /healthz, /readyz, /metrics, /openapi.json

Queries read only Redis (the read model the rating dataflow writes) and the catalog file.
"""

from __future__ import annotations

import contextlib
import html
import math
import time
from collections.abc import AsyncIterator

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from operators.stats import Stats
from runtime.settings import Settings
from schemas.usage import ENCODER as USAGE_ENCODER
from serving.auth import Client, Tokens
from serving.ingest import BrokerDown, Ingest, Judged, catalog_watch
from serving.openapi import document
from serving.page import render
from serving.usage import BadRequest, NotFound, Queries, Unavailable
from state.read_model import ReadModelReader

EVENTS = Counter("tallyflow_api_events", "Events posted to the API, by outcome.", ["outcome"])
QUERIES = Counter("tallyflow_api_queries", "Usage queries answered, by kind.", ["kind"])
SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode({"error": message}), status, media_type="application/json", headers=headers)


def build_app(s: Settings, ingest: Ingest | None = None) -> Starlette:
    tokens = Tokens.load(s.api.tokens_file)
    buckets: dict[str, _Bucket] = {}
    state: dict[str, Ingest] = {}
    watch = ingest.watch if ingest else catalog_watch(s, Stats())  # a bad catalog stops start-up here
    reader = ReadModelReader(s.stores)
    queries = Queries(watch, reader)

    def the_ingest() -> Ingest:
        if "ingest" not in state:
            state["ingest"] = ingest or Ingest(s, watch)
        return state["ingest"]

    def authorize(request: Request, scope: str, html: bool = False) -> Client | Response:
        client = tokens.client(request.headers.get("authorization"))
        if client is None:
            if html:  # a browser asks its user for the token (as the password)
                return HTMLResponse(
                    "<p>A token with the read scope is needed.</p>", 401, headers={"WWW-Authenticate": 'Basic realm="Tallyflow"'}
                )
            return Response(
                b'{"error":"a bearer token is required"}', 401, media_type="application/json", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope not in client.scopes:
            return _error(403, f"this token lacks the {scope} scope")
        return client

    def status_of(e: Exception) -> int:
        return 404 if isinstance(e, NotFound) else 503 if isinstance(e, Unavailable) else 400

    def refused(e: Exception) -> Response:
        status = status_of(e)
        return _error(status, str(e), headers={"Retry-After": "5"} if status == 503 else None)

    async def get_usage(request: Request) -> Response:
        client = authorize(request, "read")
        if isinstance(client, Response):
            return client
        try:
            usage = await queries.usage(
                request.path_params["tenant"], request.query_params.get("period"), request.query_params.get("meter")
            )
        except (NotFound, BadRequest, Unavailable) as e:
            return refused(e)
        QUERIES.labels("usage").inc()
        return Response(USAGE_ENCODER.encode(usage), media_type="application/json")

    async def get_entitlement(request: Request) -> Response:
        client = authorize(request, "read")
        if isinstance(client, Response):
            return client
        p = request.path_params
        try:
            ent = await queries.entitlement(p["tenant"], p["meter"], request.query_params.get("period"))
        except (NotFound, BadRequest, Unavailable) as e:
            return refused(e)
        QUERIES.labels("entitlement").inc()
        return Response(USAGE_ENCODER.encode(ent), media_type="application/json")

    async def usage_page(request: Request) -> Response:
        client = authorize(request, "read", html=True)
        if isinstance(client, Response):
            return client
        tenant = request.path_params["tenant"]
        try:
            usage = await queries.usage(tenant, request.query_params.get("period"))
            periods = await queries.periods(tenant)
        except (NotFound, BadRequest, Unavailable) as e:
            return HTMLResponse(f"<p>{html.escape(str(e))}</p>", status_of(e))
        if usage.period not in periods:
            periods = sorted([*periods, usage.period], reverse=True)
        QUERIES.labels("page").inc()
        return HTMLResponse(render(usage, watch.index, periods))

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
        async for chunk in request.stream():
            body += chunk
            if len(body) > s.api.max_body_bytes:
                return _error(413, f"the body is over {s.api.max_body_bytes} bytes; send smaller batches")
        batch = ctype == BATCH or (ctype == "application/json" and body.lstrip()[:1] == b"[")
        ing = the_ingest()
        parts = ing.split(body, batch)
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
        judged = parts if isinstance(parts, Judged) else await run_in_threadpool(ing.judge, parts)
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
        refused = [{"index": i, "reason": r, "message": m} for i, (r, m) in sorted(judged.refused.items())]
        body_out = {"accepted": len(accepted), "accepted_indexes": accepted, "refused": refused}
        return Response(msgspec.json.encode(body_out), 400 if refused else 202, media_type="application/json")

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        """Not ready while the broker does not answer: a load balancer sends posts elsewhere."""
        problem = await run_in_threadpool(the_ingest().broker_problem)
        if problem:
            return JSONResponse({"status": "not ready", "problems": [problem]}, 503)
        return JSONResponse({"status": "ready"})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if "ingest" in state:  # what the broker has not acknowledged yet, before exiting
            await run_in_threadpool(state["ingest"].close)
        await reader.close()

    async def openapi(_: Request) -> Response:
        return Response(msgspec.json.encode(document()), media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/events", post_events, methods=["POST"]),
            Route("/v1/tenants/{tenant}/usage", get_usage),
            Route("/v1/tenants/{tenant}/entitlements/{meter}", get_entitlement),
            Route("/tenants/{tenant}", usage_page),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
        ],
        lifespan=lifespan,
    )
