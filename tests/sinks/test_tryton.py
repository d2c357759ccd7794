"""The Tryton adapters against a real `trytond` (SQLite, the Tallyflow module), no mocks:
exact amounts, effectively once inside Tryton, unknown master data rejected with a reason,
alerts as leads once per alert id, an outage answered as "try again later"; credit records
once per record id, and the invoice: gross lines and one negative line per grant used."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from devkit.tryton import TrytonServer
from operators.ids import stable_id
from runtime.settings import Settings
from schemas.outputs import CreditRecord, RatedUsageLine, ThresholdAlert
from sinks.tryton import EntityCompanies, TrytonClient, TrytonCrm, TrytonErp, TrytonErpCredits, TrytonError
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


def credit(
    kind: str, grant_id: str, amount: str, *, customer: str = "ERP-1", line_id: str | None = None, period: str | None = "2026-03"
) -> CreditRecord:
    applied = kind in ("drawn", "returned")
    return CreditRecord(
        record_id=stable_id("credit", uuid.uuid4().hex, grant_id, kind),
        kind=kind,  # type: ignore[arg-type]
        tenant_id="acme",
        erp_customer_id=customer,
        grant_id=grant_id,
        amount=D(amount),
        currency="USD",
        at="2026-03-10T12:00:00.000Z",
        line_id=(line_id or uuid.uuid4().hex) if applied else None,
        period=period if applied else None,
    )


def credit_records(client: TrytonClient) -> dict[str, dict[str, Any]]:
    fields = ["external_id", "kind", "grant_id", "amount", "period", "party.code", "invoice", "invoice_line"]
    return {r["external_id"]: r for r in client.call("model.tallyflow.credit.search_read", [], 0, None, None, fields)}


def test_credit_records_land_exactly_once_per_record_id_and_unknown_customers_are_rejected(tryton: TrytonServer) -> None:
    erp = TrytonErpCredits(tryton.settings(Settings()).tryton)
    kinds = [("granted", "10.00"), ("drawn", "2.50"), ("returned", "0.50"), ("expired", "8.00")]
    batch = [credit(kind, "g1", amount) for kind, amount in kinds]
    answer = erp.send("k1", batch)
    assert not answer.retry and not answer.rejected and answer.detail == "4 created, 0 existing"
    # Died after Tryton committed, before the ledger heard: the same batch again, and more.
    stranger, fine = credit("drawn", "g2", "1.00", customer="ERP-404"), credit("voided", "g1", "0.00")
    again = erp.send("k1", [*batch, stranger, fine])
    assert not again.retry and set(again.rejected) == {4} and "unknown customer ERP-404" in again.rejected[4]
    assert again.detail == "1 created, 4 existing"
    got = credit_records(tryton.client())
    assert set(got) == {r.record_id for r in [*batch, fine]}
    for r in batch:
        assert (got[r.record_id]["kind"], got[r.record_id]["amount"], got[r.record_id]["party."]["code"]) == (r.kind, r.amount, "ERP-1")
    finer, undated = credit("drawn", "g3", "0.001"), msgspec.structs.replace(credit("drawn", "g3", "1.00"), period=None)
    why = erp.send("k2", [finer, undated]).rejected
    assert "more decimals than USD" in why[0] and "missing period" in why[1]
    erp.close()


def test_the_invoice_shows_the_gross_lines_and_one_negative_line_per_grant_used(tryton: TrytonServer) -> None:
    s = tryton.settings(Settings()).tryton
    usage = [line("10.00"), line("4.00"), line("5.00", product="TOK"), line("2.00", customer="ERP-2"), line("9.99", currency="EUR")]
    assert not TrytonErp(s).send("u", usage).rejected
    ledger = [
        credit("granted", "g1", "20.00"),  # grant-level: no money on the invoice
        credit("drawn", "g1", "3.00"),
        credit("drawn", "g1", "2.00"),
        credit("returned", "g1", "1.00"),  # g1 used 4.00
        credit("drawn", "g2", "1.50"),
        credit("drawn", "g3", "0.70"),
        credit("returned", "g3", "0.70"),  # g3 drawn and given back in full: no line
        credit("drawn", "g4", "2.00", customer="ERP-2"),  # ERP-2's whole gross
        credit("drawn", "g5", "1.00", customer="ERP-3"),  # ERP-3: credits only, an invoice of its own
        credit("drawn", "g1", "9.00", period="2026-04"),  # another period: not on this invoice
    ]
    answer = TrytonErpCredits(s).send("c", ledger)
    assert not answer.rejected and answer.detail == f"{len(ledger)} created, 0 existing"

    client = tryton.client()
    out = {(r["party"], r["currency"]): r for r in client.call("model.tallyflow.usage.invoice_period", "2026-03", None, False)}
    assert set(out) == {("ERP-1", "USD"), ("ERP-1", "EUR"), ("ERP-2", "USD"), ("ERP-3", "USD")}
    acme = out[("ERP-1", "USD")]
    assert (acme["gross"], acme["credits"], acme["untaxed_amount"]) == (D("19.00"), D("5.50"), D("13.50"))
    assert (acme["lines"], acme["grants"], acme["credit_records"]) == (4, 2, 6)
    assert out[("ERP-2", "USD")]["untaxed_amount"] == D(0) and out[("ERP-3", "USD")]["untaxed_amount"] == D("-1.00")
    assert out[("ERP-1", "EUR")]["untaxed_amount"] == D("9.99")

    lines = client.call(
        "model.account.invoice.line.search_read",
        [("invoice", "=", acme["invoice"])],
        0,
        None,
        [("id", "ASC")],
        ["product.code", "quantity", "unit_price", "amount", "description"],
    )
    assert sorted((ln["product."]["code"], ln["amount"]) for ln in lines) == [
        ("CALLS", D("14.00")),
        ("TALLYFLOW-CREDIT", D("-4.00")),
        ("TALLYFLOW-CREDIT", D("-1.50")),
        ("TOK", D("5.00")),
    ]
    assert sorted(ln["description"].split(" applied")[0] for ln in lines if ln["amount"] < 0) == ["Prepaid credit g1", "Prepaid credit g2"]
    got = credit_records(client)
    march = [r for r in ledger if r.period == "2026-03"]
    assert all(got[r.record_id]["invoice"] is not None for r in march)  # g3 too: settled, with no line
    assert [got[r.record_id]["invoice_line"] for r in ledger[5:7]] == [None, None]
    assert got[ledger[-1].record_id]["invoice"] is None and got[ledger[0].record_id]["invoice"] is None
    assert client.call("model.tallyflow.usage.invoice_period", "2026-03", None, False) == []  # nothing left

    # An invoiced credit record is read-only; posting takes the negative lines as they are.
    with pytest.raises(TrytonError, match="invoiced"):
        client.call("model.tallyflow.credit.write", [got[ledger[1].record_id]["id"]], {"amount": D("3.01")})
    posted = client.call("model.tallyflow.usage.invoice_period", "2026-04", None, True)
    assert [(r["party"], r["untaxed_amount"], r["state"]) for r in posted] == [("ERP-1", D("-9.00"), "posted")]


def test_each_legal_entity_books_under_its_company_and_invoices_there(tryton: TrytonServer, tryton_catalog: Path) -> None:
    """SPEC §10.2: a line, a credit record and an alert of a legal entity go under that entity's
    company (TF-US, TF-EU), each company invoices its own records in its own currency and
    posts them; an entity the catalog does not declare, or a company Tryton lacks, is
    rejected with why, and the rest of the batch lands."""
    s = tryton.settings(Settings()).tryton
    companies = EntityCompanies(str(tryton_catalog))
    us = line("10.00", customer="ERP-1", currency="USD")
    eu = [rated_line(tenant_id="euro-co", erp_customer_id="ERP-4", currency="EUR", amount=a, legal_entity="eu") for a in ("20.00", "0.50")]
    us = msgspec.structs.replace(us, legal_entity="us")
    mars = msgspec.structs.replace(line("1.00"), legal_entity="mars")
    answer = TrytonErp(s, companies=companies).send("k", [us, mars, *eu])
    assert not answer.retry and set(answer.rejected) == {1} and "legal entity mars is not declared" in answer.rejected[1]
    assert answer.detail == "3 created, 0 existing"
    drawn = msgspec.structs.replace(credit("drawn", "g-eu", "5.00", customer="ERP-4"), currency="EUR", legal_entity="eu")
    lead = msgspec.structs.replace(alert(1, account="CRM-4"), legal_entity="eu")
    for answer in (TrytonErpCredits(s, companies=companies).send("c", [drawn]), TrytonCrm(s, companies=companies).send("a", [lead])):
        assert not answer.retry and not answer.rejected and answer.detail == "1 created, 0 existing"

    client = tryton.client()
    fields = ["external_id", "company.party.code", "company.currency.code"]
    booked = {r["external_id"]: r["company."] for r in client.call("model.tallyflow.usage.search_read", [], 0, None, None, fields)}
    assert {k: (c["party."]["code"], c["currency."]["code"]) for k, c in booked.items()} == {
        us.line_id: ("TF-US", "USD"),
        eu[0].line_id: ("TF-EU", "EUR"),
        eu[1].line_id: ("TF-EU", "EUR"),
    }
    (credit_row,) = client.call("model.tallyflow.credit.search_read", [], 0, None, None, ["company.party.code"])
    (lead_row,) = client.call(
        "model.sale.opportunity.search_read", [("tallyflow_alert_id", "=", lead.alert_id)], 0, None, None, ["company.party.code"]
    )
    assert credit_row["company."]["party."]["code"] == lead_row["company."]["party."]["code"] == "TF-EU"

    # An item naming a company Tryton does not have: rejected, never booked under another.
    odd = {**msgspec.to_builtins(line("2.00")), "erp_company": "TF-NOWHERE"}
    (why,) = client.call("model.tallyflow.usage.ingest", [odd]).values()
    assert why.startswith("rejected: unknown ERP company TF-NOWHERE")

    posted = client.call("model.tallyflow.usage.invoice_period", "2026-03", None, True)
    got = {(r["company"], r["party"], r["currency"]): (r["untaxed_amount"], r["state"]) for r in posted}
    assert got == {("TF-US", "ERP-1", "USD"): (D("10.00"), "posted"), ("TF-EU", "ERP-4", "EUR"): (D("15.50"), "posted")}
    invoices = client.call("model.account.invoice.read", [r["invoice"] for r in posted], ["company.party.code", "number", "move.company"])
    assert all(inv["number"] and inv["move."]["company"] == inv["company."]["id"] for inv in invoices)


def test_a_user_who_cannot_work_in_an_entitys_company_is_told_so_and_nothing_is_invoiced(
    tryton: TrytonServer, tryton_catalog: Path
) -> None:
    """Tryton's record rules use the user's companies under its company filter: with filter
    "one" the user works in its current company only. An item of the other company is then
    rejected with the fix named, and invoicing a period with records there refuses the
    whole call, rather than invoicing one company and not the other."""
    s = tryton.settings(Settings()).tryton
    companies = EntityCompanies(str(tryton_catalog))
    us = msgspec.structs.replace(line("1.00"), legal_entity="us")
    eu = rated_line(tenant_id="euro-co", erp_customer_id="ERP-4", currency="EUR", amount="2.00", legal_entity="eu")
    assert not TrytonErp(s, companies=companies).send("k", [us, eu]).rejected  # both companies booked
    client = tryton.client()
    (admin,) = client.call("model.res.user.search", [("login", "=", "admin")], 0, None, None)
    client.call("model.res.user.write", [admin], {"company_filter": "one"})
    later = rated_line(tenant_id="euro-co", erp_customer_id="ERP-4", currency="EUR", amount="3.00", legal_entity="eu")
    why = TrytonErp(s, companies=companies).send("k2", [later]).rejected[0]
    assert why.startswith("unknown ERP company TF-EU") and "company filter to All" in why
    with pytest.raises(TrytonError, match='company "Tallyflow GmbH" waits to be invoiced, but this user cannot work in it'):
        client.call("model.tallyflow.usage.invoice_period", "2026-03", None, False)
    assert client.call("model.account.invoice.search_count", []) == 0


def test_the_entity_map_follows_the_catalog_file(tmp_path: Path, tryton_catalog: Path) -> None:
    """An entity's company corrected in the catalog reaches the ERP delivery without a restart."""
    path = tmp_path / "catalog.yaml"
    path.write_bytes(tryton_catalog.read_bytes())
    companies = EntityCompanies(str(path))
    companies.RELOAD_S = 0.0
    assert companies("eu") == "TF-EU" and companies("uk") is None
    path.write_text(path.read_text().replace("TF-EU", "TF-DE"))
    assert companies("eu") == "TF-DE"
    path.write_text("entities: [")  # an edit half-way: the last good catalog stands
    assert companies("eu") == "TF-DE"
