"""The review desk over HTTP (SPEC §10.1): `GET /v1/review` lists what waits, `POST
/v1/review/{id}/approve|reject` decides it as the token's client, with why; unknown and
already decided ids are refused and decide nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import pytest

from devkit.stack import LocalStack
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.outputs import ENCODER, HeldItem, ReviewDecision
from tests.serving.conftest import READER, REVIEWER
from tests.support.lines import rated_line

FINANCE = {"Authorization": f"Bearer {REVIEWER}"}


@pytest.fixture
def desk(small: Settings, stack: LocalStack) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = small.replace(review_topic=f"review-{tag}", audit_topic=f"audit-{tag}", redis_url=stack.redis_url)
    stack.create_topics({s.topics.review: 1, s.topics.audit: 1})
    return s


def _held(tenant: str, amount: str) -> HeldItem:
    ln = rated_line(tenant_id=tenant, amount=amount, review="amount_over_limit: over the limit")
    return HeldItem(
        review_id=ln.line_id,
        kind="line",
        tenant_id=tenant,
        period=ln.period,
        amount=ln.amount,
        currency="USD",
        reason="amount_over_limit: over the limit",
        held_at=ln.window_start,
        item=msgspec.Raw(ENCODER.encode(ln)),
    )


def test_the_desk_lists_and_decides_as_the_tokens_client(api: Callable[..., httpx.Client], desk: Settings) -> None:
    flat: dict[str, Any] = {"review_topic": desk.topics.review, "audit_topic": desk.topics.audit, "redis_url": desk.stores.redis_url}
    c = api(**flat)
    a, b = _held("acme", "250.00"), _held("bolt", "300.00")
    records = [(desk.topics.review, ENCODER.encode(h), h.tenant_id.encode()) for h in (a, b, a)]
    kafka.produce_confirmed(desk.kafka.config(), records, "held item(s)")  # a replay held `a` again: listed once
    listed = c.get("/v1/review", headers=FINANCE).json()
    assert listed["count"] == 2 and {h["review_id"] for h in listed["pending"]} == {a.review_id, b.review_id}
    assert c.get("/v1/review", params={"tenant": "bolt"}, headers=FINANCE).json()["pending"][0]["item"]["amount"] == "300.00"
    assert c.get("/v1/review", headers={"Authorization": f"Bearer {READER}"}).status_code == 403  # no review:write
    bound = c.get("/v1/review", headers={"Authorization": "Bearer acme-finance-token-0123"})
    assert bound.status_code == 403 and "every tenant" in bound.json()["error"]

    assert c.post(f"/v1/review/{a.review_id}/approve", json={}, headers=FINANCE).status_code == 400  # no why
    assert c.post("/v1/review/nope/approve", json={"why": "x"}, headers=FINANCE).status_code == 404
    ok = c.post(f"/v1/review/{a.review_id}/approve", json={"why": "the customer confirmed"}, headers=FINANCE)
    assert ok.status_code == 200 and (ok.json()["decision"], ok.json()["by"]) == ("approve", "finance")
    again = c.post(f"/v1/review/{a.review_id}/reject", json={"why": "second thoughts"}, headers=FINANCE)
    assert again.status_code == 409 and "already approved by finance" in again.json()["error"]
    (d,) = [msgspec.json.decode(v, type=ReviewDecision) for v in read_topic(desk.kafka.config(), desk.topics.audit)]
    assert (d.review_id, d.decision, d.by, d.why, d.amount) == (
        a.review_id,
        "approve",
        "finance",
        "the customer confirmed",
        Decimal("250.00"),
    )
    assert [h["review_id"] for h in c.get("/v1/review", headers=FINANCE).json()["pending"]] == [b.review_id]


def test_the_review_page_lists_and_decides_from_its_own_forms_only(api: Callable[..., httpx.Client], desk: Settings) -> None:
    flat: dict[str, Any] = {"review_topic": desk.topics.review, "audit_topic": desk.topics.audit, "redis_url": desk.stores.redis_url}
    c = api(**flat)
    a = _held("acme", "250.00")
    kafka.produce_confirmed(desk.kafka.config(), [(desk.topics.review, ENCODER.encode(a), b"acme")], "held item")
    assert c.get("/review").status_code == 401  # a browser asks for the token
    page = c.get("/review", auth=("me", REVIEWER))
    assert page.status_code == 200 and a.review_id in page.text and f'action="/review/{a.review_id}"' in page.text
    assert "form-action 'self'" in page.headers["content-security-policy"]
    form = {"why": "confirmed by phone", "action": "approve"}
    forged = c.post(f"/review/{a.review_id}", data=form, auth=("me", REVIEWER), headers={"Sec-Fetch-Site": "cross-site"})
    assert forged.status_code == 403 and read_topic(desk.kafka.config(), desk.topics.audit) == []  # another site's form: nothing decided
    ok = c.post(f"/review/{a.review_id}", data=form, auth=("me", REVIEWER), headers={"Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 303 and ok.headers["location"].startswith("/review?done=approved")
    (d,) = [msgspec.json.decode(v, type=ReviewDecision) for v in read_topic(desk.kafka.config(), desk.topics.audit)]
    assert (d.decision, d.by, d.why) == ("approve", "finance", "confirmed by phone")
    assert "Nothing waits for review." in c.get("/review", auth=("me", REVIEWER)).text
