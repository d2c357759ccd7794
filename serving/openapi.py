"""The API's OpenAPI 3.1 document, generated from the msgspec types it speaks."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from schemas.events import CloudEvent, GrantData
from schemas.outputs import StatusNotice
from schemas.usage import Credits, Entitlement, TenantUsage

LISTED_REFUSALS = 100  # a 400 lists the first refusals by position; `refused_count` counts all


class Refusal(msgspec.Struct):
    index: int
    reason: str
    message: str


class IngestAnswer(msgspec.Struct):
    accepted: int
    accepted_indexes: Annotated[list[int], msgspec.Meta(description="every accepted position; every other one was refused")]
    refused: Annotated[list[Refusal], msgspec.Meta(description=f"the first {LISTED_REFUSALS} refusals by position, with why")]
    refused_count: Annotated[int, msgspec.Meta(description="all refusals, listed or not")]


class Error(msgspec.Struct):
    error: str


class Refused(msgspec.Struct):
    error: str
    reason: Annotated[str, msgspec.Meta(description="the dead-letter reason the rating dataflow would give it (bad_grant, ...)")]


class CreditEventAnswer(msgspec.Struct):
    grant_id: str
    event_id: Annotated[str, msgspec.Meta(description="the CloudEvent's id: the same for the same grant, so a retry is a duplicate")]
    type: str


class Forbidden(msgspec.Struct):
    error: str
    index: Annotated[int | None, msgspec.Meta(description="the first event for a tenant the token does not serve")] = None


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [
            IngestAnswer,
            Error,
            Refused,
            Forbidden,
            CloudEvent,
            TenantUsage,
            Entitlement,
            Credits,
            GrantData,
            CreditEventAnswer,
            StatusNotice,
        ],
        ref_template="#/components/schemas/{name}",
    )
    err = {"content": _json("Error")}
    page = {"content": {"text/html": {"schema": {"type": "string"}}}}
    retry = {"headers": {"Retry-After": {"description": "seconds to wait before asking again", "schema": {"type": "integer"}}}}
    tenant = {"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}}
    period = {
        "name": "period",
        "in": "query",
        "required": False,
        "description": "YYYY-MM (YYYY-MM-DD for daily plans); default: the current period",
        "schema": {"type": "string"},
    }
    read = {
        "401": {"description": "no or unknown bearer token", **err},
        "403": {"description": "the token lacks the read scope, or does not serve this tenant", **err},
        "400": {"description": "a malformed period", **err},
        "404": {"description": "no such tenant, or the meter is not in its plan", **err},
        "503": {"description": "the usage store does not answer, or the catalog is behind the usage; ask again", **err, **retry},
    }
    write = {
        "400": {"description": "a bad grant (the field named) or event", "content": _json("Refused")},
        "401": {"description": "no or unknown bearer token", **err},
        "403": {"description": "the token lacks the credits:write scope, or does not serve this tenant", **err},
        "503": {"description": "the broker did not acknowledge; send again", **err, **retry},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tallyflow API",
            "version": "1",
            "description": "Usage events in over HTTP (CloudEvents 1.0); usage and entitlements out.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}, "basic": {"type": "http", "scheme": "basic"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/events": {
                "post": {
                    "summary": "Post one CloudEvent or a batch; 202 once the broker acknowledged every accepted event",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/cloudevents+json": {"schema": {"$ref": "#/components/schemas/CloudEvent"}},
                            "application/cloudevents-batch+json": {
                                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/CloudEvent"}}
                            },
                        },
                    },
                    "responses": {
                        "202": {"description": "every event accepted and on the input topic", "content": _json("IngestAnswer")},
                        "400": {
                            "description": "some events refused (by position, why); the others are on the topic",
                            "content": _json("IngestAnswer"),
                        },
                        "401": {"description": "no or unknown bearer token", **err},
                        "403": {
                            "description": "the token lacks the ingest scope, or an event (the first at `index`) is for a tenant "
                            "the token does not serve or grants or voids credits without the credits:write scope; nothing was sent",
                            "content": _json("Forbidden"),
                        },
                        "408": {"description": "the body did not arrive in time", **err},
                        "413": {"description": "body over the size limit", **err},
                        "415": {"description": "not a CloudEvents content type", **err},
                        "429": {"description": "over the client's events per second", **err, **retry},
                        "503": {"description": "the broker did not acknowledge; send again", **err, **retry},
                    },
                }
            },
            "/v1/tenants/{tenant}/usage": {
                "get": {
                    "summary": "A billing period's usage per meter: quantity, amount, included/used/remaining, levels crossed",
                    "parameters": [
                        tenant,
                        period,
                        {"name": "meter", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "the read model (zeros before the first event)", "content": _json("TenantUsage")},
                        **read,
                    },
                }
            },
            "/v1/tenants/{tenant}/entitlements/{meter}": {
                "get": {
                    "summary": "May the tenant use the meter: has_access is false once usage reaches the plan's hard limit",
                    "parameters": [tenant, {"name": "meter", "in": "path", "required": True, "schema": {"type": "string"}}, period],
                    "responses": {
                        "200": {"description": "measured under the pricing version in force", "content": _json("Entitlement")},
                        **read,
                    },
                }
            },
            "/v1/erp/status": {
                "post": {
                    "summary": "An ERP's invoice state (Standard Webhooks, signed with TALLYFLOW_ERP_WEBHOOK_SECRET), on to the CRM",
                    "security": [],
                    "parameters": [
                        {"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                        for h in ("webhook-id", "webhook-timestamp", "webhook-signature")
                    ],
                    "requestBody": {"required": True, "content": _json("StatusNotice")},
                    "responses": {
                        "202": {"description": "on erp.status (or parked with its reason: an unknown customer)"},
                        "400": {"description": "not an invoice status (the field named)", **err},
                        "401": {"description": "not signed right (missing, stale or bad signature)", **err},
                        "404": {"description": "no webhook secret configured", **err},
                        "503": {"description": "the broker did not acknowledge; send again", **err, **retry},
                    },
                }
            },
            "/v1/review": {
                "get": {
                    "summary": "What waits for a person before the ERP (scope review:write, a token not bound to tenants)",
                    "parameters": [{"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "the held items that wait: id, tenant, period, kind, amount, reason, the item"},
                        "401": {"description": "no or unknown bearer token", **err},
                        "403": {"description": "the token lacks review:write, or is bound to tenants", **err},
                    },
                }
            },
            "/v1/review/{review_id}/{action}": {
                "post": {
                    "summary": 'Approve or reject a held item (action approve|reject), body {"why": ...}; the token\'s client is who',
                    "parameters": [
                        {"name": "review_id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "action", "in": "path", "required": True, "schema": {"enum": ["approve", "reject"]}},
                    ],
                    "responses": {
                        "200": {"description": "decided: the audit record is on usage.audit"},
                        "400": {"description": "no why", **err},
                        "401": {"description": "no or unknown bearer token", **err},
                        "403": {"description": "the token lacks review:write, or is bound to tenants", **err},
                        "404": {"description": "no held item with this id", **err},
                        "409": {"description": "already decided (by whom, when, why)", **err},
                    },
                }
            },
            "/review": {
                "get": {
                    "summary": "The review desk for people (HTML): what waits, each with a form to approve or reject it",
                    "security": [{"bearer": []}, {"basic": []}],
                    "parameters": [{"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "the page", **page}, "401": {"description": "no token", **page}},
                }
            },
            "/review/{review_id}": {
                "post": {
                    "summary": "The page's form: action=approve|reject and why; 303 back to the page (same-origin requests only)",
                    "security": [{"bearer": []}, {"basic": []}],
                    "parameters": [{"name": "review_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "303": {"description": "decided: back to the page"},
                        "400": {"description": "no why, or no action", **page},
                        "403": {"description": "not review:write, a bound token, or another site's form", **page},
                        "409": {"description": "already decided", **page},
                    },
                }
            },
            "/v1/tenants/{tenant}/credits": {
                "get": {
                    "summary": "The tenant's prepaid grants: granted, used, expired, voided, remaining, expiry, status",
                    "parameters": [tenant, period],
                    "responses": {"200": {"description": "as of the read model", "content": _json("Credits")}, **read},
                }
            },
            "/v1/tenants/{tenant}/grants": {
                "post": {
                    "summary": "Grant prepaid credits (scope credits:write): produced as a tallyflow.credit.granted event",
                    "parameters": [tenant],
                    "requestBody": {"required": True, "content": _json("GrantData")},
                    "responses": {"202": {"description": "on the input topic", "content": _json("CreditEventAnswer")}, **write},
                }
            },
            "/v1/tenants/{tenant}/grants/{grant_id}/void": {
                "post": {
                    "summary": "Void what remains of a grant (scope credits:write): a tallyflow.credit.voided event",
                    "parameters": [tenant, {"name": "grant_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"202": {"description": "on the input topic", "content": _json("CreditEventAnswer")}, **write},
                }
            },
            "/tenants/{tenant}": {
                "get": {
                    "summary": "The usage page for people (HTML); the token may come as the password of HTTP Basic",
                    "parameters": [tenant, period],
                    "security": [{"bearer": []}, {"basic": []}],
                    # People get HTML, even refused; a 503 is JSON with Retry-After, as everywhere.
                    "responses": {
                        "200": {"description": "the page", **page},
                        **{status: {"description": r["description"], **page} for status, r in read.items() if status != "503"},
                        "503": read["503"],
                    },
                }
            },
            "/healthz": {"get": {"summary": "the process is alive", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "summary": "ready for traffic: the broker and Redis answer",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, "503": {"description": "not ready; `problems` says why"}},
                }
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "metrics"}}}},
        },
    }
