"""The HTTP adapters alone (httpx.MockTransport): the request each sends, and how each
response becomes an Answer. No server and no Redis: the courier is tested elsewhere."""

from __future__ import annotations

import base64
import time
from decimal import Decimal

import httpx
import orjson
import pytest
import standardwebhooks
from standardwebhooks.webhooks import WebhookVerificationError

from runtime.settings import CrmSettings, ErpSettings, SuccessSettings
from schemas.outputs import CreditRecord, RatedUsageLine
from sinks.crm import CrmHttp
from sinks.erp import ErpCreditsHttp, ErpHttp
from sinks.success import SuccessWebhook
from tests.support.lines import rated_line, threshold_alert

ALERT = threshold_alert(
    alert_id="a-1",
    period="2026-11",
    crossed_at="2026-11-02T10:00:00.000Z",
    correlation_id="e-9",
    plan_id="starter",
    detected_at="2026-11-02T10:00:00.050Z",
)


def line(i: int) -> RatedUsageLine:
    return rated_line(
        line_id=f"l-{i}",
        product_code="SKU",
        quantity=i,
        amount=Decimal("0.10") * i,
        pricing_version="starter:v1",
        event_count=i,
        at="2026-11-02T10:00:00.000Z",
    )


def transport(status: int, seen: list[httpx.Request], headers: dict[str, str] | None = None) -> httpx.MockTransport:
    def handle(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(status, headers=headers, json={"status": status})

    return httpx.MockTransport(handle)


def test_crm_posts_one_alert_to_its_account_with_the_alert_id_as_idempotency_key():
    seen: list[httpx.Request] = []
    crm = CrmHttp(CrmSettings(url="http://crm", token="t0k"), 5, transport(200, seen))
    answer = crm.send("a-1", [ALERT])
    assert not answer.retry and not answer.rejected
    (req,) = seen
    assert req.url.path == "/crm/accounts/CRM-1/signals"
    assert req.headers["Idempotency-Key"] == "a-1" and req.headers["Authorization"] == "Bearer t0k"
    assert orjson.loads(req.content)["correlation_id"] == "e-9"


SECRET = "whsec_" + base64.b64encode(b"a secret of the success tool").decode()


def test_the_success_webhook_verifies_with_an_independent_standard_webhooks_implementation():
    seen: list[httpx.Request] = []
    SuccessWebhook(SuccessSettings(url="http://cs", hmac_key=SECRET), 5, transport(202, seen)).send("a-1", [ALERT])
    (req,) = seen
    headers = {k: req.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    assert headers["webhook-id"] == "a-1" and "Authorization" not in req.headers
    assert standardwebhooks.Webhook(SECRET).verify(req.content, headers)["alert_id"] == ALERT.alert_id
    with pytest.raises(WebhookVerificationError):  # a body changed on the way
        standardwebhooks.Webhook(SECRET).verify(req.content.replace(b"e-9", b"e-8"), headers)
    with pytest.raises(WebhookVerificationError):  # another secret
        standardwebhooks.Webhook("whsec_" + base64.b64encode(b"another").decode()).verify(req.content, headers)


def test_a_captured_webhook_replayed_later_is_refused_by_the_receiver():
    seen: list[httpx.Request] = []
    old = SuccessWebhook(SuccessSettings(url="http://cs", hmac_key=SECRET), 5, transport(202, seen), clock=lambda: time.time() - 301)
    old.send("a-1", [ALERT])
    (req,) = seen
    headers = {k: req.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    with pytest.raises(WebhookVerificationError, match="too old"):
        standardwebhooks.Webhook(SECRET).verify(req.content, headers)


def test_the_erp_gets_one_batch_under_its_key_with_exact_amounts():
    seen: list[httpx.Request] = []
    answer = ErpHttp(ErpSettings(url="http://erp"), 5, transport(200, seen)).send("k-1", [line(1), line(3)])
    assert not answer.retry and not answer.rejected
    body = orjson.loads(seen[0].content)
    assert body["batch_id"] == "k-1" and [ln["amount"] for ln in body["lines"]] == ["0.10", "0.30"]


def test_credit_records_go_to_their_own_path_in_batches_of_their_own_under_their_key():
    seen: list[httpx.Request] = []
    records = [
        CreditRecord(
            record_id=f"r-{i}",
            kind="drawn",
            tenant_id="acme",
            erp_customer_id="ERP-1",
            grant_id="g",
            amount=Decimal("0.10") * i,
            currency="USD",
            at="2026-11-02T10:00:00.000Z",
            line_id=f"l-{i}",
            period="2026-11",
        )
        for i in (1, 3)
    ]
    answer = ErpCreditsHttp(ErpSettings(url="http://erp", token="t0k"), 5, transport(200, seen)).send("k-2", records)
    assert not answer.retry and not answer.rejected
    (req,) = seen
    assert req.url.path == "/erp/credit-batches" and req.headers["Idempotency-Key"] == "k-2"
    assert req.headers["Authorization"] == "Bearer t0k"
    body = orjson.loads(req.content)
    assert body["batch_id"] == "k-2" and [(r["record_id"], r["amount"]) for r in body["credits"]] == [("r-1", "0.10"), ("r-3", "0.30")]
    assert "lines" not in body


@pytest.mark.parametrize(
    ("status", "headers", "retry", "rejected", "wait"),
    [
        (200, None, False, 0, None),
        (409, None, False, 0, None),  # the remote has it already
        (422, None, False, 2, None),  # rejected for good: both lines
        (429, {"Retry-After": "7"}, True, 0, 7.0),
        (503, None, True, 0, None),
        (408, None, True, 0, None),
    ],
)
def test_responses_become_answers(status, headers, retry, rejected, wait):
    answer = ErpHttp(ErpSettings(url="http://erp"), 5, transport(status, [], headers)).send("k", [line(1), line(2)])
    assert (answer.retry, len(answer.rejected), answer.retry_after) == (retry, rejected, wait)
    assert answer.status == status


def test_a_transport_error_is_not_a_decision():
    def boom(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    answer = CrmHttp(CrmSettings(url="http://crm"), 5, httpx.MockTransport(boom)).send("a-1", [ALERT])
    assert answer.retry and answer.status == "ConnectError"
