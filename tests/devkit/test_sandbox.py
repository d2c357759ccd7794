"""The sandbox checks each endpoint's own credential, and its fault API needs a token."""

from __future__ import annotations

import hashlib
import hmac

import httpx
import orjson

from devkit.sandbox import Sandbox

LINE = {"batch_id": "b", "lines": [{"line_id": "l1", "tenant_id": "t", "currency": "USD", "amount": "1.00"}]}
ALERT = {"alert_id": "a1"}


def test_each_endpoint_checks_its_own_credential_and_faults_need_the_admin_token():
    with Sandbox(hmac_key=b"k", crm_token="crm", erp_token="erp", admin_token="adm") as sb:
        c = httpx.Client(base_url=sb.url)
        erp = {"Idempotency-Key": "b"}
        assert c.post("/erp/usage-batches", json=LINE, headers={**erp, "Authorization": "Bearer crm"}).status_code == 401
        assert c.post("/erp/usage-batches", json=LINE, headers={**erp, "Authorization": "Bearer erp"}).status_code == 200
        crm = {"Idempotency-Key": "a1"}
        assert c.post("/crm/accounts/X/signals", json=ALERT, headers={**crm, "Authorization": "Bearer erp"}).status_code == 401
        assert c.post("/crm/accounts/X/signals", json=ALERT, headers={**crm, "Authorization": "Bearer crm"}).status_code == 200
        body = orjson.dumps(ALERT)
        good = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
        assert c.post("/success/webhook", content=body, headers={"X-Tallyflow-Signature": "sha256=00"}).status_code == 401
        assert c.post("/success/webhook", content=body, headers={"X-Tallyflow-Signature": good}).status_code == 200

        fault = {"target": "erp", "mode": "down"}
        assert c.post("/api/faults", json=fault).status_code == 401
        assert c.delete("/api/faults").status_code == 401
        assert sb.state.faults == {}
        assert c.post("/api/faults", json=fault, headers={"Authorization": "Bearer adm"}).status_code == 200
        assert set(sb.state.faults) == {"erp"}


def test_the_page_shows_tables_not_raw_json():
    with Sandbox(erp_token="erp") as sb:
        c = httpx.Client(base_url=sb.url)
        line = {**LINE["lines"][0], "erp_customer_id": "ERP-1", "quantity": "3", "window_start": "2026-11-02T10:00:00.000Z"}
        body = {"batch_id": "b", "lines": [line]}
        assert c.post("/erp/usage-batches", json=body, headers={"Idempotency-Key": "b", "Authorization": "Bearer erp"}).status_code == 200
        page = c.get("/").text
        assert "<table>" in page and "<td>l1</td>" in page and "<td>ERP-1</td>" in page
        assert "{" not in page.split("<body>", 1)[1]  # no JSON dumped into the page
