"""Prepaid credits over HTTP (SPEC §9.5): a grant and a void posted as the CloudEvents the
rating dataflow reads (scope `credits:write`), and the balances read back from the read
model — `GET /v1/tenants/{t}/credits` and the entitlement answer's `credits_remaining`."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from devkit.pipeline import wait_until
from operators.periods import iso, period_of
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.events import GRANTED, VOIDED
from tests.serving.conftest import BILLING, INGEST, READER, bearer
from tests.support.events import ev
from tests.support.flows import OwnRedis, start_rating

NOW_MS = int(time.time() * 1000)
CURRENT = period_of(NOW_MS, "month")
READ = {"Authorization": f"Bearer {READER}"}
GRANT = {"grant_id": "g-1", "amount": "2.00", "currency": "USD", "priority": 5, "effective_at": iso(CURRENT.start_ms)}


def on(r: OwnRedis) -> dict[str, Any]:
    return {"redis_url": f"redis://127.0.0.1:{r.port}"}


def _input(s: Settings) -> list[dict[str, Any]]:
    return [orjson.loads(v) for v in read_topic(s.kafka.brokers, s.topics.input)]


def test_a_grant_and_a_void_become_the_events_the_dataflow_reads(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    billing = {"Authorization": f"Bearer {BILLING}"}
    r = c.post("/v1/tenants/acme/grants", json=GRANT, headers=billing)
    assert r.status_code == 202, r.text
    assert r.json() == {"grant_id": "g-1", "event_id": "grant:g-1", "type": GRANTED}
    again = c.post("/v1/tenants/acme/grants", json=GRANT, headers=billing)  # a retry after a lost answer
    assert again.status_code == 202 and again.json()["event_id"] == "grant:g-1"  # the same event: a duplicate downstream
    void = c.post("/v1/tenants/acme/grants/g-1/void", headers=billing)
    assert void.status_code == 202 and void.json()["type"] == VOIDED
    events = _input(small)
    assert [(e["type"], e["subject"], e["id"]) for e in events] == [
        (GRANTED, "acme", "grant:g-1"),
        (GRANTED, "acme", "grant:g-1"),
        (VOIDED, "acme", "void:g-1"),
    ]
    assert events[0]["data"] == GRANT and events[2]["data"] == {"grant_id": "g-1"}


def test_a_bad_grant_is_refused_with_the_field_named_and_nothing_sent(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    billing = {"Authorization": f"Bearer {BILLING}"}
    cases = {
        "data.amount": {**GRANT, "amount": "1.005"},  # finer than the cent
        "currency": {k: v for k, v in GRANT.items() if k != "currency"},
        "data.expires_at": {**GRANT, "expires_at": iso(CURRENT.start_ms - 1000)},
        "data.meters": {**GRANT, "meters": ["nope"]},
    }
    for field, body in cases.items():
        r = c.post("/v1/tenants/acme/grants", json=body, headers=billing)
        assert r.status_code == 400, (field, r.text)
        assert r.json()["reason"] == "bad_grant" and field in r.json()["error"], (field, r.json())
    assert c.post("/v1/tenants/ghost/grants", json=GRANT, headers=billing).json()["reason"] == "unknown_tenant"
    assert _input(small) == []


def test_granting_needs_the_credits_write_scope_on_every_route(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    assert c.post("/v1/tenants/acme/grants", json=GRANT, headers={"Authorization": f"Bearer {INGEST}"}).status_code == 403
    assert c.post("/v1/tenants/acme/grants/g-1/void", headers={"Authorization": f"Bearer {READER}"}).status_code == 403
    grant_event = ev("acme", GRANTED, at=datetime.now(UTC), data=GRANT, id="grant-by-ingest")
    usage = ev("acme", at=datetime.now(UTC), id="a-call")
    r = c.post("/v1/events", content=b"[" + usage + b"," + grant_event + b"]", headers=bearer(INGEST, "application/cloudevents-batch+json"))
    assert r.status_code == 403 and r.json()["index"] == 1, r.text
    assert _input(small) == []  # nothing of the batch was sent
    ok = c.post("/v1/events", content=grant_event, headers=bearer(BILLING))
    assert ok.status_code == 202, ok.text


@pytest.mark.integration
def test_the_balance_follows_the_draws_in_the_credits_api_and_the_entitlement_answer(
    api: Callable[..., httpx.Client], small: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    """A grant of USD 2.00 posted over HTTP, then 25 calls (10 included, 0.10 each over):
    the rated lines draw USD 1.50 and the tenant's balance, as the API tells it, is 0.50."""
    s = small.replace(**on(own_redis))
    c = api(**on(own_redis))
    billing = {"Authorization": f"Bearer {BILLING}"}
    assert c.post("/v1/tenants/acme/grants", json=GRANT, headers=billing).status_code == 202
    at = max(CURRENT.start_ms, NOW_MS - 120_000)
    calls = [ev("acme", at=datetime.fromtimestamp((at + i) / 1000, UTC), id=f"c-{i}") for i in range(25)]
    assert (
        c.post(
            "/v1/events", content=b"[" + b",".join(calls) + b"]", headers=bearer(INGEST, "application/cloudevents-batch+json")
        ).status_code
        == 202
    )
    rating = start_rating(s, tmp_path / "rating.log", TALLYFLOW_IDLE_TIMEOUT_SECONDS="1")
    try:

        def drawn() -> dict[str, Any] | None:
            r = c.get("/v1/tenants/acme/credits", headers=READ)
            assert r.status_code == 200, r.text
            doc: dict[str, Any] = r.json()
            return doc if doc["grants"] and doc["grants"][0]["used"] == "1.50" else None

        doc = wait_until(drawn, 60, "the rated lines to draw USD 1.50 from g-1")
        (g,) = doc["grants"]
        assert (g["grant_id"], g["granted"], g["remaining"], g["status"], g["expires_at"]) == ("g-1", "2.00", "0.50", "active", None)
        assert doc["remaining"] == {"USD": "0.50"} and doc["period"] == CURRENT.key
        ent = c.get("/v1/tenants/acme/entitlements/calls", headers=READ).json()
        assert (ent["used"], ent["currency"], ent["credits_remaining"]) == ("25", "USD", "0.50")
        usage = c.get("/v1/tenants/acme/usage", headers=READ).json()
        assert [(x["grant_id"], x["remaining"]) for x in usage["credits"]] == [("g-1", "0.50")]
        page = c.get("/tenants/acme", auth=("me", READER)).text
        assert 'id="credits"' in page and "g-1" in page
    finally:
        rating.terminate()
        rating.wait(30)
