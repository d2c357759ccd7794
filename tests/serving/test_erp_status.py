"""ERP invoice states back to the CRM (SPEC §10.3): an ERP's signed webhook on `tallyflow api`
(Standard Webhooks, signed here with the success tool's signer, checked by the API's own
verifier), `erp.status`, and the status delivery process to the CRM sandbox — once per state
change, across a retried webhook and a kill -9; an unknown customer parked with its reason."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest

from devkit.pipeline import wait_until
from devkit.sandbox import Sandbox
from devkit.stack import LocalStack
from operators.status import secret_bytes
from ops import exceptions
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.outputs import InvoiceStatus
from sinks.success import sign
from tests.dataflows.test_delivery import FlowProcess
from tests.support.events import CATALOG
from tests.support.flows import write_catalog

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGhlLWVycA=="  # base64 of "secret-key-for-the-erp"


@pytest.fixture
def ssettings(small: Settings, stack: LocalStack) -> Iterator[tuple[Settings, Sandbox]]:
    with Sandbox() as sb:
        tag = uuid.uuid4().hex[:8]
        s = small.replace(
            status_topic=f"status-{tag}",
            exceptions_topic=f"exceptions-{tag}",
            erp_webhook_secret=SECRET,
            crm_url=sb.url,
            retry_base_seconds=0.05,
            retry_cap_seconds=0.5,
        )
        stack.create_topics({s.topics.status: 1, s.topics.exceptions: 1})
        yield s, sb


def _post(
    c: httpx.Client, notice: dict[str, Any], *, msg_id: str | None = None, ts: int | None = None, key: str = SECRET
) -> httpx.Response:
    body = orjson.dumps(notice)
    msg_id = msg_id or f"msg-{uuid.uuid4().hex}"
    ts = int(time.time()) if ts is None else ts
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret_bytes(key), msg_id, ts, body)}
    return c.post("/v1/erp/status", content=body, headers={**headers, "Content-Type": "application/json"})


def _statuses(s: Settings) -> list[InvoiceStatus]:
    return [msgspec.json.decode(v, type=InvoiceStatus) for v in read_topic(s.kafka.config(), s.topics.status)]


NOTICE = {
    "invoice_id": "INV-7",
    "erp_customer_id": "ERP-1",
    "state": "posted",
    "at": "2026-12-01T09:00:00Z",
    "amount": "78.20",
    "currency": "USD",
}


def test_a_forged_or_stale_webhook_is_refused_and_sends_nothing(api: Callable[..., httpx.Client], ssettings: Any) -> None:
    s, _ = ssettings
    c = api(**_flat(s))
    unsigned = c.post("/v1/erp/status", json=NOTICE)
    assert unsigned.status_code == 401 and "missing webhook-id" in unsigned.json()["error"]
    assert _post(c, NOTICE, key="whsec_" + "b3RoZXIta2V5").status_code == 401  # another key
    stale = _post(c, NOTICE, ts=int(time.time()) - 3600)
    assert stale.status_code == 401 and "webhook-timestamp" in stale.json()["error"]
    bad = _post(c, {**NOTICE, "state": "lost"})
    assert bad.status_code == 400 and "state" in bad.json()["error"]
    assert _statuses(s) == []


@pytest.mark.integration
def test_each_invoice_state_reaches_the_crm_once_and_an_unknown_customer_is_parked(
    api: Callable[..., httpx.Client], ssettings: Any, tmp_path: Path
) -> None:
    s, sandbox = ssettings
    c = api(**_flat(s))
    posted = _post(c, NOTICE, msg_id="m-1")
    assert posted.status_code == 202 and posted.json()["tenant_id"] == "acme"
    assert _post(c, NOTICE, msg_id="m-1").json() == posted.json()  # the ERP retried: the same change
    paid = _post(c, {**NOTICE, "state": "paid", "at": "2026-12-09T15:30:00Z"}, msg_id="m-2")
    assert paid.status_code == 202 and paid.json()["status_id"] != posted.json()["status_id"]
    unknown = _post(c, {**NOTICE, "erp_customer_id": "ERP-404"}, msg_id="m-3")
    assert unknown.status_code == 202 and unknown.json()["parked"].startswith("unknown_customer: no tenant")
    (parked,) = [orjson.loads(v) for v in read_topic(s.kafka.config(), s.topics.exceptions)]
    assert parked["destination"] == "erp-status" and parked["ids"] == ["INV-7"] and "ERP-404" in parked["reasons"]["INV-7"]
    sts = _statuses(s)
    assert [(st.state, st.tenant_id, st.crm_account_id) for st in sts] == [("posted", "acme", "CRM-1")] * 2 + [("paid", "acme", "CRM-1")]
    # The customer joins the catalog: a re-drive tells the parked state (its status id is the
    # same however often it is re-driven, so the CRM gets it once).
    newco = {**CATALOG["tenants"][0], "tenant_id": "new-co", "erp_customer_id": "ERP-404", "crm_account_id": "CRM-9"}
    joined = {**CATALOG, "tenants": [*CATALOG["tenants"], newco]}
    write_catalog(Path(s.process.catalog), joined)
    assert exceptions.redrive(s, exceptions.load(s, ["erp-status"])) == {"erp-status": 1}
    assert [(st.invoice_id, st.tenant_id, st.crm_account_id) for st in _statuses(s)[3:]] == [("INV-7", "new-co", "CRM-9")]

    crm = sandbox.state.endpoints["crm-status"]
    want = {posted.json()["status_id"], paid.json()["status_id"]}
    flow = FlowProcess("dataflows.status:get_flow()", s, tmp_path / "status.log")
    try:
        wait_until(lambda: set(crm.accepted) == want, 60, "both states at the CRM account")
        got = crm.accepted[paid.json()["status_id"]]
        assert (got["invoice_id"], got["state"], got["amount"], got["crm_account_id"]) == ("INV-7", "paid", "78.20", "CRM-1")
        flow.kill9()
        flow = FlowProcess("dataflows.status:get_flow()", s, tmp_path / "status.log")  # reads erp.status again
        _post(c, {**NOTICE, "state": "cancelled", "at": "2026-12-10T08:00:00Z"}, msg_id="m-4")
        wait_until(lambda: len(crm.accepted) == 3, 60, "the cancellation at the CRM, after the restart")
        assert crm.duplicates == [] and len(crm.requests) == 3  # nothing sent twice
    finally:
        flow.stop()


def _flat(s: Settings) -> dict[str, Any]:
    return {"status_topic": s.topics.status, "exceptions_topic": s.topics.exceptions, "erp_webhook_secret": SECRET}
