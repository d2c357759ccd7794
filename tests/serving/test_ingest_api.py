"""`tallyflow api` over real HTTP on loopback against the real broker: auth and scopes, each
status code of POST /v1/events, a mixed batch losing nothing, and a valid OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema
import orjson
import yaml
from openapi_spec_validator import validate

from devkit.pipeline import wait_until
from devkit.stack import free_port
from runtime.kafka import read_topic
from runtime.settings import Settings
from serving.app import BATCH, SINGLE
from tests.serving.conftest import INGEST, READER, SLOW, bearer
from tests.support.events import ev
from tests.support.flows import write_catalog


def test_tokens_and_scopes(api: Callable[..., httpx.Client]) -> None:
    c = api()
    one = ev("acme")
    assert c.post("/v1/events", content=one, headers={"Content-Type": SINGLE}).status_code == 401
    assert c.post("/v1/events", content=one, headers=bearer("not-a-token-at-all")).status_code == 401
    assert c.post("/v1/events", content=one, headers=bearer(READER)).status_code == 403
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert b"tallyflow_api_events" in c.get("/metrics").content


def test_one_event_is_on_the_topic_keyed_by_tenant_when_202_comes_back(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    body = ev("bolt", id="http-1")
    r = c.post("/v1/events", content=body, headers=bearer(INGEST))
    assert r.status_code == 202 and r.json() == {"accepted": 1, "accepted_indexes": [0], "refused": [], "refused_count": 0}
    # Acknowledged means on the topic: readable at once, no waiting.
    assert read_topic(small.kafka.brokers, small.topics.input) == [body]


def test_a_mixed_batch_says_which_were_refused_and_loses_none_of_the_others(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    good = [ev("acme", id=f"b{i}") for i in range(3)]
    bad_tenant = ev("nobody", id="x1")
    not_json = b'{"specversion": "1.0", '
    body = b"[" + b",".join([good[0], bad_tenant, good[1], b'{"specversion": "0.3"}', good[2]]) + b"]"
    r = c.post("/v1/events", content=body, headers=bearer(INGEST, BATCH))
    assert r.status_code == 400
    doc = r.json()
    assert doc["accepted"] == 3 and doc["accepted_indexes"] == [0, 2, 4]
    assert [x["index"] for x in doc["refused"]] == [1, 3]
    assert doc["refused"][0]["reason"] == "unknown_tenant" and doc["refused"][1]["reason"] == "schema"
    assert sorted(read_topic(small.kafka.brokers, small.topics.input)) == sorted(good)
    r2 = c.post("/v1/events", content=not_json, headers=bearer(INGEST))
    assert r2.status_code == 400 and r2.json()["refused"][0]["reason"] == "invalid_json"


def test_too_large_is_413_and_the_wrong_type_415(api: Callable[..., httpx.Client]) -> None:
    c = api(api_max_body_bytes=2000)
    big = b"[" + b",".join(ev("acme", id=f"big{i}") for i in range(30)) + b"]"
    assert c.post("/v1/events", content=big, headers=bearer(INGEST, BATCH)).status_code == 413
    assert c.post("/v1/events", content=b"a=b", headers=bearer(INGEST, "application/x-www-form-urlencoded")).status_code == 415


def test_over_the_clients_rate_is_429_with_retry_after(api: Callable[..., httpx.Client]) -> None:
    c = api()
    # 50 events at 5 events/s: admitted on a full bucket, then the client owes ~10 s.
    fifty = b"[" + b",".join(ev("acme", id=f"r{i}") for i in range(50)) + b"]"
    assert c.post("/v1/events", content=fifty, headers=bearer(SLOW, BATCH)).status_code == 202
    r = c.post("/v1/events", content=fifty, headers=bearer(SLOW, BATCH))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 5
    assert c.post("/v1/events", content=fifty, headers=bearer(INGEST, BATCH)).status_code == 202  # another client is not held


def test_broker_unreachable_is_503_and_nothing_is_promised(api: Callable[..., httpx.Client]) -> None:
    c = api(brokers=f"127.0.0.1:{free_port()}", api_produce_timeout_seconds=1.0)
    r = c.post("/v1/events", content=ev("acme"), headers=bearer(INGEST))
    assert r.status_code == 503 and "send them again" in r.json()["error"]
    ready = c.get("/readyz")
    assert ready.status_code == 503 and "do not answer" in ready.json()["problems"][0]
    assert c.get("/healthz").status_code == 200  # alive: restarting it would not bring the broker back


def test_the_openapi_document_is_valid_openapi_3_1(api: Callable[..., httpx.Client]) -> None:
    c = api()
    doc = orjson.loads(c.get("/openapi.json").content)
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {
        "/v1/events",
        "/v1/tenants/{tenant}/usage",
        "/v1/tenants/{tenant}/entitlements/{meter}",
        "/v1/tenants/{tenant}/credits",
        "/v1/erp/status",
        "/v1/review",
        "/v1/review/{review_id}/{action}",
        "/review",
        "/review/{review_id}",
        "/v1/tenants/{tenant}/grants",
        "/v1/tenants/{tenant}/grants/{grant_id}/void",
        "/tenants/{tenant}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    # What the query endpoints answer is what the document says they answer.
    auth = {"Authorization": f"Bearer {READER}"}
    for path, name in (("/v1/tenants/acme/usage", "TenantUsage"), ("/v1/tenants/acme/entitlements/calls", "Entitlement")):
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(c.get(path, headers=auth).json(), schema)


def test_a_tenant_onboarded_in_the_catalog_is_accepted_without_a_restart(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api(catalog_reload_seconds=0.2)
    newco = ev("newco", id="n1")
    assert c.post("/v1/events", content=newco, headers=bearer(INGEST)).json()["refused"][0]["reason"] == "unknown_tenant"
    cat = yaml.safe_load(Path(small.process.catalog).read_text())
    cat["tenants"].append({**cat["tenants"][0], "tenant_id": "newco", "crm_account_id": "CRM-9", "erp_customer_id": "ERP-9"})
    write_catalog(Path(small.process.catalog), cat)
    wait_until(lambda: c.post("/v1/events", content=newco, headers=bearer(INGEST)).status_code == 202, 30, "newco accepted")
