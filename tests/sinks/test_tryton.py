"""The Tryton adapters against a real `trytond` (SQLite, the Tallyflow module), no mocks:
exact amounts, effectively once inside Tryton, unknown master data rejected with a reason,
alerts as leads once per alert id, an outage answered as "try again later"."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import msgspec

from devkit.tryton import TrytonServer
from runtime.settings import Settings
from schemas.outputs import RatedUsageLine, ThresholdAlert
from sinks.tryton import TrytonClient, TrytonCrm, TrytonErp
from tests.dataflows.test_delivery import alerts
from tests.support.lines import rated_line

D = Decimal


def line(amount: str, *, customer: str = "ERP-1", product: str = "CALLS", currency: str = "USD", revision: int = 0) -> RatedUsageLine:
    return rated_line(
        erp_customer_id=customer, product_code=product, currency=currency, revision=revision, quantity=3, amount=amount, event_count=3
    )


def records(client: TrytonClient) -> dict[str, dict[str, Any]]:
    rows = client.call(
        "model.tallyflow.usage.search_read",
        [],
        0,
        None,
        None,
        ["external_id", "amount", "quantity", "revision", "party.code", "currency.code", "product.code"],
    )
    return {r["external_id"]: r for r in rows}


def test_lines_and_corrections_land_exactly_once_per_line_id(tryton: TrytonServer) -> None:
    erp = TrytonErp(tryton.settings(Settings()).tryton)
    batch = [line("12.34"), line("0.01", product="TOK"), line("-0.05", revision=1), line("1000.01", customer="ERP-2", currency="EUR")]
    answer = erp.send("k1", batch)
    assert not answer.retry and not answer.rejected and answer.detail == "4 created, 0 existing"

    # The adapter died after Tryton committed and before the ledger heard: the same batch again.
    again = erp.send("k1", [*batch, line("99.99")])
    assert not again.retry and not again.rejected and again.detail == "1 created, 4 existing"

    got = records(tryton.client())
    assert len(got) == 5
    for ln in batch:
        r = got[ln.line_id]
        assert r["amount"] == ln.amount and r["revision"] == ln.revision  # stored exactly, not re-priced
        assert (r["party."]["code"], r["currency."]["code"], r["product."]["code"]) == (ln.erp_customer_id, ln.currency, ln.product_code)
    assert sum((r["amount"] for r in got.values()), D(0)) == D("1112.30")
    erp.close()


def test_unknown_customer_or_product_is_rejected_with_why_and_lands_once_fixed(tryton: TrytonServer) -> None:
    erp = TrytonErp(tryton.settings(Settings()).tryton)
    good, stranger, odd = line("1.00"), line("2.00", customer="ERP-404"), line("3.00", product="NOPE")
    answer = erp.send("k", [good, stranger, odd])
    assert not answer.retry
    assert set(answer.rejected) == {1, 2}
    assert "unknown customer ERP-404" in answer.rejected[1] and "unknown product NOPE" in answer.rejected[2]

    client = tryton.client()
    client.call("model.party.party.create", [{"name": "New customer", "code": "ERP-404"}])
    fixed = erp.send("k", [good, stranger])
    assert not fixed.rejected and fixed.detail == "1 created, 1 existing"
    assert set(records(client)) == {good.line_id, stranger.line_id}


def test_tryton_down_is_try_again_later_and_nothing_is_decided(tryton: TrytonServer) -> None:
    erp = TrytonErp(tryton.settings(Settings()).tryton, timeout_s=2)
    tryton.stop()
    answer = erp.send("k", [line("5.00")])
    assert answer.retry and not answer.rejected and answer.status == "ConnectError"
    tryton.start()
    ln = line("5.00")
    assert erp.send("k", [ln]).detail == "1 created, 0 existing"
    assert set(records(tryton.client())) == {ln.line_id}


def alert(i: int, account: str = "CRM-1") -> ThresholdAlert:
    (a,) = alerts(1)
    return msgspec.structs.replace(
        a,
        alert_id=f"alert-{i}-{uuid.uuid4().hex[:6]}",
        tenant_id="acme",
        crm_account_id=account,
        meter="calls",
        period="2026-03",
        limit=D(10),
        usage=D(11),
        correlation_id=f"event-{i}",
    )


def test_an_alert_becomes_one_lead_for_the_crm_account_with_level_usage_and_correlation(tryton: TrytonServer) -> None:
    crm = TrytonCrm(tryton.settings(Settings()).tryton)
    a = alert(1)
    assert not crm.send(a.alert_id, [a]).rejected
    assert crm.send(a.alert_id, [a]).detail == "0 created, 1 existing"  # a re-send after a crash
    stranger = alert(2, account="CRM-404")
    assert "CRM-404" in crm.send(stranger.alert_id, [stranger]).rejected[0]

    fields = [
        "tallyflow_alert_id",
        "tallyflow_level",
        "tallyflow_usage",
        "tallyflow_period",
        "tallyflow_correlation_id",
        "party.code",
        "state",
    ]
    leads = tryton.client().call("model.sale.opportunity.search_read", [("tallyflow_alert_id", "!=", None)], 0, None, None, fields)
    assert len(leads) == 1
    (lead,) = leads
    assert lead["tallyflow_alert_id"] == a.alert_id and lead["party."]["code"] == "ERP-1"  # found by its CRM alias
    assert (lead["tallyflow_level"], lead["tallyflow_usage"], lead["tallyflow_period"]) == ("100%", D(11), "2026-03")
    assert lead["tallyflow_correlation_id"] == "event-1" and lead["state"] == "lead"


def test_the_lines_encode_as_tryton_takes_them() -> None:
    """Decimals travel as exact strings, never floats (Tryton refuses a float amount)."""
    (doc,) = msgspec.to_builtins([line("0.10")])
    assert doc["amount"] == "0.10" and doc["quantity"] == "3"
