"""The API's OpenAPI 3.1 document, generated from the msgspec types it speaks."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.events import CloudEvent
from schemas.usage import Entitlement, TenantUsage


class Refusal(msgspec.Struct):
    index: int
    reason: str
    message: str


class IngestAnswer(msgspec.Struct):
    accepted: int
    accepted_indexes: list[int]
    refused: list[Refusal]


class Error(msgspec.Struct):
    error: str


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [IngestAnswer, Error, CloudEvent, TenantUsage, Entitlement], ref_template="#/components/schemas/{name}"
    )
    err = {"content": _json("Error")}
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
        "403": {"description": "the token lacks the read scope", **err},
        "400": {"description": "a malformed period", **err},
        "404": {"description": "no such tenant, or the meter is not in its plan", **err},
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
                        "403": {"description": "the token lacks the ingest scope", **err},
                        "413": {"description": "body over the size limit", **err},
                        "415": {"description": "not a CloudEvents content type", **err},
                        "429": {"description": "over the client's events per second; see Retry-After", **err},
                        "503": {"description": "the broker did not acknowledge; send again", **err},
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
            "/tenants/{tenant}": {
                "get": {
                    "summary": "The usage page for people (HTML); the token may come as the password of HTTP Basic",
                    "parameters": [tenant, period],
                    "security": [{"bearer": []}, {"basic": []}],
                    "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}, **read},
                }
            },
            "/healthz": {"get": {"summary": "the process is alive", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "ready for traffic", "security": [], "responses": {"200": {"description": "ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "metrics"}}}},
        },
    }
