"""The ERP-delivery dataflow into a real Tryton: the backlog waits out an outage, a crash
between Tryton's commit and the ledger write leaves no duplicate, unknown customers are
parked and re-driven, and the period's invoices equal what Tallyflow rated, to the cent:
the gross lines less one negative line per prepaid grant used."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from confluent_kafka import Producer

from dataflows import FLOWS
from devkit.pipeline import wait_until
from devkit.stack import LocalStack
from devkit.tryton import TrytonServer
from ops import exceptions, invoice
from ops.reconcile import recount
from runtime.kafka import read_topic
from runtime.settings import Settings, to_env
from schemas.outputs import ENCODER
from sinks.tryton import TrytonClient
from state import review
from state.ledger import Ledger
from tallyflow.cli import main as tallyflow
from tests.dataflows.test_delivery import FlowProcess, produce, with_exceptions_topic
from tests.sinks.test_tryton import line
from tests.support import credits
from tests.support.events import ev
from tests.support.flows import MIN, produce_events, run_bounded

D = Decimal


@pytest.fixture
def tsettings(small: Settings, stack: LocalStack, tryton: TrytonServer) -> Settings:
    return with_exceptions_topic(tryton.settings(small), stack, erp_kind="tryton", erp_batch_max_lines=100)


@pytest.fixture
def erp_flow(tmp_path: Path) -> Iterator[Callable[[Settings], FlowProcess]]:
    started: list[FlowProcess] = []

    def start(s: Settings) -> FlowProcess:
        started.append(FlowProcess(FLOWS["erp"], s, tmp_path / "erp.log"))
        return started[-1]

    yield start
    for fp in started:
        fp.stop()


def in_tryton(client: TrytonClient) -> dict[str, Decimal]:
    rows = client.call("model.tallyflow.usage.search_read", [], 0, None, None, ["external_id", "amount"])
    ids = [r["external_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a line id is in Tryton twice"
    return {r["external_id"]: r["amount"] for r in rows}


def test_tryton_down_the_backlog_waits_and_drains_once(tsettings: Settings, tryton: TrytonServer, erp_flow: Any, tmp_path: Path) -> None:
    backlog = [line(f"{i % 97}.{i % 100:02d}", customer=f"ERP-{1 + i % 3}") for i in range(300)]
    tryton.stop()
    erp_flow(tsettings)
    produce(tsettings, tsettings.topics.rated, backlog)
    log = tmp_path / "erp.log"
    wait_until(lambda: log.exists() and log.read_text().count("ConnectError") >= 3, 30, "the delivery to be retrying against the outage")
    tryton.start()
    client = tryton.client()
    wait_until(lambda: len(in_tryton(client)) == 300, 60, "the backlog to drain into Tryton")
    assert in_tryton(client) == {ln.line_id: ln.amount for ln in backlog}
    assert Ledger(tsettings.stores).unacked("erp", [ln.line_id for ln in backlog]) == []


def test_a_crash_between_trytons_commit_and_the_ledger_write_leaves_no_duplicate(
    tsettings: Settings, tryton: TrytonServer, erp_flow: Any
) -> None:
    batch = [line("1.25", revision=r % 2) for r in range(120)]
    produce(tsettings, tsettings.topics.rated, batch)
    first = erp_flow(tsettings)
    client = tryton.client()
    wait_until(lambda: len(in_tryton(client)) == 120, 60, "the lines in Tryton")
    first.kill9()
    # The state such a crash leaves: Tryton committed, the ledger never heard of the lines.
    ids = [ln.line_id for ln in batch]
    Ledger(tsettings.stores).forget("erp", ids)
    more = [line("2.50") for _ in range(10)]
    produce(tsettings, tsettings.topics.rated, more)
    erp_flow(tsettings)  # re-reads the topic from its start and sends every line again
    wait_until(lambda: Ledger(tsettings.stores).unacked("erp", ids + [m.line_id for m in more]) == [], 60, "every line acknowledged")
    got = in_tryton(client)
    assert len(got) == 130 and sum(got.values(), D(0)) == D("1.25") * 120 + D("2.50") * 10


def test_an_unknown_customer_is_parked_and_redriven_once_created(tsettings: Settings, tryton: TrytonServer, erp_flow: Any) -> None:
    known = [line("3.00") for _ in range(20)]
    strangers = [line("7.00", customer="ERP-NEW") for _ in range(5)]
    produce(tsettings, tsettings.topics.rated, known + strangers)
    erp_flow(tsettings)
    parked = wait_until(lambda: read_topic(tsettings.kafka.brokers, tsettings.topics.exceptions), 60, "the exception record")
    rec = orjson.loads(parked[0])
    assert rec["destination"] == "erp" and set(rec["ids"]) == {ln.line_id for ln in strangers}
    assert all("unknown customer ERP-NEW" in why for why in rec["reasons"].values())
    client = tryton.client()
    assert set(in_tryton(client)) == {ln.line_id for ln in known}

    client.call("model.party.party.create", [{"name": "A new customer", "code": "ERP-NEW"}])  # the master data fixed
    sent = exceptions.redrive(tsettings, exceptions.load(tsettings, ["erp"]))
    assert sent == {"erp": 5}
    wait_until(lambda: len(in_tryton(client)) == 25, 60, "the re-driven lines in Tryton")
    assert exceptions.redrive(tsettings, exceptions.load(tsettings, ["erp"])) == {"erp": 0}  # nothing rejected any more


def test_invoices_of_the_period_equal_the_rated_totals_to_the_cent(tsettings: Settings, tryton: TrytonServer, erp_flow: Any) -> None:
    values = [ev(t, "api.request", at=i * MIN / 7) for i in range(150) for t in ("acme", "bolt")]
    values += [ev("acme", "llm.tokens", at=i * MIN, data={"tokens": 333 + i}) for i in range(30)]
    run_bounded(tsettings, produce_events(tsettings, values))
    lines = {orjson.loads(v)["line_id"]: orjson.loads(v) for v in read_topic(tsettings.kafka.brokers, tsettings.topics.rated)}
    erp_flow(tsettings)
    client = tryton.client()
    wait_until(lambda: len(in_tryton(client)) == len(lines), 60, "every rated line in Tryton")

    out = invoice.close_period(tsettings, "2026-03")
    assert out["differences"] == [] and out["duplicate_line_ids"] == 0 and out["invoices_created"] == 2
    # ... and against reconcile's own recount of the input (source totals), per customer.
    source, _ = recount(tsettings)
    customers = {"acme": "ERP-1", "bolt": "ERP-2"}
    by_customer: dict[str, Decimal] = {}
    for (tenant, _meter, _period), amount in source.amount.items():
        by_customer[customers[tenant]] = by_customer.get(customers[tenant], D(0)) + amount
    invoices = client.call("model.account.invoice.search_read", [], 0, None, None, ["untaxed_amount", "party.code"])
    assert {i["party."]["code"]: i["untaxed_amount"] for i in invoices} == by_customer
    assert out["by_currency"]["USD"]["invoiced"] == str(sum(by_customer.values(), D(0)))
    assert invoice.close_period(tsettings, "2026-03")["invoices_created"] == 0  # nothing left to invoice


def test_the_invoice_has_the_gross_lines_and_one_negative_line_per_grant_used_and_the_check_holds(
    tsettings: Settings, tryton: TrytonServer, erp_flow: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines, records = credits.rate(tsettings)
    erp_flow(tsettings)
    client = tryton.client()
    held = lambda: client.call("model.tallyflow.credit.search_read", [], 0, None, None, ["external_id"])  # noqa: E731
    wait_until(lambda: len(in_tryton(client)) == len(lines) and len(held()) == len(records), 60, "every line and record in Tryton")
    for k, v in to_env(tsettings).items():
        monkeypatch.setenv(k, v)

    def invoice_cli(*args: str) -> tuple[int, dict[str, Any]]:
        code = tallyflow(["invoice", "--period", "2026-03", "--json", *args])
        return code, orjson.loads(capsys.readouterr().out)

    code, out = invoice_cli()
    assert code == 0 and out["differences"] == [] and out["invoices_created"] == 2, out
    assert out["duplicate_record_ids"] == 0 and out["credit_records"] == sum(1 for r in records if r.kind in ("drawn", "returned"))
    used = credits.used_per_grant(lines)
    assert used == {"a-big": D("5.00"), "a-trial": D("1.00"), "b-1": D("1.50")}
    gross = {c: sum((ln.amount for ln in lines if ln.erp_customer_id == c), D(0)) for c in ("ERP-1", "ERP-2")}
    usd = out["by_currency"]["USD"]
    assert D(usd["rated_gross"]) == sum(gross.values(), D(0)) and D(usd["rated_credits"]) == D("7.50")
    assert D(usd["invoiced"]) == D(usd["rated"]) == sum(gross.values(), D(0)) - D("7.50")

    invoices = client.call("model.account.invoice.search_read", [], 0, None, None, ["party.code", "untaxed_amount"])
    net = {"ERP-1": gross["ERP-1"] - D("6.00"), "ERP-2": gross["ERP-2"] - D("1.50")}
    assert {i["party."]["code"]: i["untaxed_amount"] for i in invoices} == net
    party = {i["id"]: i["party."]["code"] for i in invoices}
    fields = ["invoice", "product.code", "amount", "description"]
    inv_lines = client.call("model.account.invoice.line.search_read", [], 0, None, None, fields)
    credit_lines = [ln for ln in inv_lines if ln["product."]["code"] == "TALLYFLOW-CREDIT"]
    negative = sorted((party[ln["invoice"]], ln["description"].split()[2], ln["amount"]) for ln in credit_lines)
    assert negative == [("ERP-1", "a-big", D("-5.00")), ("ERP-1", "a-trial", D("-1.00")), ("ERP-2", "b-1", D("-1.50"))]
    assert {ln["product."]["code"] for ln in inv_lines if ln["amount"] > 0} == {"CALLS", "SEAT"}

    # A draw the ERP never got (on the ledger topic, not in Tryton): the check fails, exit 1.
    drawn = next(r for r in records if r.kind == "drawn" and r.grant_id == "b-1")
    lost = msgspec.structs.replace(drawn, record_id="lost-draw", amount=D("0.25"))
    p = Producer({"bootstrap.servers": tsettings.kafka.brokers})
    p.produce(tsettings.topics.credits, ENCODER.encode(lost), lost.tenant_id.encode())
    p.flush()
    code, out = invoice_cli()
    (row,) = out["differences"]
    assert code == 1 and out["invoices_created"] == 0 and row["customer"] == "ERP-2"
    assert (D(row["ledger_credits"]), D(row["rated_credits"]), D(row["tryton_credits"])) == (D("1.75"), D("1.50"), D("1.50"))


def test_tryton_invoice_states_are_told_once_each_for_the_crm(tsettings: Settings, tryton: TrytonServer) -> None:
    """SPEC §10.3 with Tryton as the ERP: the poller tells each state an invoice reaches
    (draft, then posted) on erp.status once, for the tenant of its customer, across polls and
    a new poller (its cursor and what it told are in Redis)."""
    from ops.status import TrytonInvoices
    from schemas.outputs import InvoiceStatus
    from sinks.tryton import TrytonErp
    from tests.sinks.test_tryton import line as tline

    assert not TrytonErp(tsettings.tryton).send("u", [tline("10.00"), tline("2.50", customer="ERP-2")]).rejected
    invoice.close_period(tsettings, "2026-03")  # two draft invoices

    def told() -> list[InvoiceStatus]:
        return [msgspec.json.decode(v, type=InvoiceStatus) for v in read_topic(tsettings.kafka.config(), tsettings.topics.status)]

    poller = TrytonInvoices(tsettings)
    assert poller.once() == {"invoices": 2, "told": 2, "parked": 0}
    assert sorted((st.tenant_id, st.crm_account_id, st.state, st.amount) for st in told()) == [
        ("acme", "CRM-1", "draft", D("10.00")),
        ("bolt", "CRM-2", "draft", D("2.50")),
    ]
    assert poller.once()["told"] == 0  # nothing changed: nothing told again
    client = tryton.client()
    (acme_invoice,) = client.call("model.account.invoice.search", [["party.code", "=", "ERP-1"]], 0, None, None)
    client.call("model.account.invoice.post", [acme_invoice])
    again = TrytonInvoices(tsettings)  # a restarted poller: its cursor and what it told are kept
    assert again.once()["told"] == 1
    states = [(st.tenant_id, st.state) for st in told()]
    assert sorted(states) == [("acme", "draft"), ("acme", "posted"), ("bolt", "draft")]
    assert len({st.status_id for st in told()}) == 3


def test_a_poller_that_dies_after_the_broker_confirmed_tells_the_same_states_again(
    tsettings: Settings, tryton: TrytonServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poller's crash window: statuses on erp.status, its cursor and what it told not yet
    in Redis. The next poller tells them again under the same status ids, so the status
    delivery's ledger (keyed by status id) takes each change once; nothing is lost."""
    import redis as redis_lib

    from ops.status import TrytonInvoices
    from schemas.outputs import InvoiceStatus
    from sinks.tryton import TrytonErp
    from tests.sinks.test_tryton import line as tline

    assert not TrytonErp(tsettings.tryton).send("u", [tline("10.00"), tline("2.50", customer="ERP-2")]).rejected
    invoice.close_period(tsettings, "2026-03")  # two draft invoices

    def told() -> list[InvoiceStatus]:
        return [msgspec.json.decode(v, type=InvoiceStatus) for v in read_topic(tsettings.kafka.config(), tsettings.topics.status)]

    dying = TrytonInvoices(tsettings)

    class Lost:  # the process died here: Redis never hears of the poll
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any, **kwargs: Any) -> Any:
                raise redis_lib.ConnectionError("killed")

            return fail if name == "execute" else lambda *a, **k: None

    monkeypatch.setattr(dying.r, "pipeline", lambda **_: Lost())
    with pytest.raises(redis_lib.ConnectionError):
        dying.once()
    first = told()
    assert len(first) == 2
    assert TrytonInvoices(tsettings).once()["told"] == 2  # the next poller: told again ...
    again = told()[2:]
    assert sorted(st.status_id for st in again) == sorted(st.status_id for st in first)  # ... as the same changes
    assert TrytonInvoices(tsettings).once()["told"] == 0  # and now remembered


def test_invoice_states_reach_the_party_in_trytons_crm_once(tsettings: Settings, tryton: TrytonServer, tmp_path: Path) -> None:
    """`deliver status` with the Tryton CRM: each state a billing-status record of the party of
    its CRM account, once per status id (told twice, and read again after a kill -9), and the
    party shows its newest state, whatever order they arrive in."""
    import datetime as dt

    from operators.catalog_index import CatalogIndex
    from operators.status import status_of
    from runtime import kafka
    from schemas.catalog import parse_catalog
    from schemas.outputs import ENCODER as OUT
    from schemas.outputs import StatusNotice
    from tests.support.events import CATALOG

    s = tsettings.replace(crm_kind="tryton")
    cat = CatalogIndex.build(parse_catalog(CATALOG))

    def record(invoice: str, state: str, hour: int) -> tuple[str, bytes, bytes]:
        at = dt.datetime(2026, 4, 2, hour, tzinfo=dt.UTC)
        st = status_of(cat, StatusNotice(invoice_id=invoice, erp_customer_id="ERP-1", state=state, at=at))  # type: ignore[arg-type]
        assert not isinstance(st, str)
        return (s.topics.status, OUT.encode(st), b"acme")

    first = [record("tryton-1", state, h) for state, h in (("draft", 9), ("posted", 10), ("paid", 11))]
    kafka.produce_confirmed(s.kafka.config(), first + first[:1], "status(es)")  # the first one twice
    client = tryton.client()

    def in_crm() -> list[dict[str, Any]]:
        return client.call("model.tallyflow.billing_status.search_read", [], 0, None, None, ["external_id", "state", "party.code"])

    flow = FlowProcess(FLOWS["status"], s, tmp_path / "status.log")
    try:
        wait_until(lambda: len(in_crm()) == 3, 60, "three billing statuses in Tryton")
        flow.kill9()
        flow = FlowProcess(FLOWS["status"], s, tmp_path / "status.log")  # reads erp.status from the start again
        kafka.produce_confirmed(s.kafka.config(), [record("tryton-2", "draft", 8)], "status")  # older than tryton-1's paid
        wait_until(lambda: len(in_crm()) == 4, 60, "the new status after the restart")
    finally:
        flow.stop()
    rows = in_crm()
    assert len({r["external_id"] for r in rows}) == 4 and {r["party."]["code"] for r in rows} == {"ERP-1"}
    assert sorted(r["state"] for r in rows) == ["draft", "draft", "paid", "posted"]
    (party,) = client.call("model.party.party.search_read", [["code", "=", "ERP-1"]], 0, None, None, ["tallyflow_billing_status"])
    assert party["tallyflow_billing_status"] == "tryton-1: paid"


def test_each_entity_is_invoiced_by_its_company_and_review_decides_what_is_billed(
    tsettings: Settings, tryton: TrytonServer, tryton_catalog: Path, erp_flow: Any
) -> None:
    """SPEC §10.2 and §10.1 end to end: the ERP delivery books each entity's lines under its
    company; `tallyflow invoice` invoices per company and reports per entity; a line still
    held for review is a difference (and counted as held) until a person decides: approved,
    it is posted and invoiced; rejected, it is not billed and not counted."""
    s = tsettings.replace(catalog=str(tryton_catalog))
    us = [msgspec.structs.replace(line(a), legal_entity="us") for a in ("3.00", "4.50")]
    euro = dict(tenant_id="euro-co", erp_customer_id="ERP-4", currency="EUR", legal_entity="eu")
    eu = [msgspec.structs.replace(line("7.00"), **euro)]
    spike, bogus = (msgspec.structs.replace(line(a), **euro, review="tenant_review: euro-co") for a in ("900.00", "450.00"))
    produce(s, s.topics.rated, [*us, spike, *eu, bogus])
    erp_flow(s)
    client = tryton.client()
    wait_until(lambda: len(in_tryton(client)) == 3, 60, "the lines not held in Tryton")

    before = invoice.close_period(s, "2026-03")
    assert before["held_for_review"] == 2 and [(d["entity"], d["customer"]) for d in before["differences"]] == [("eu", "ERP-4")]
    assert before["invoices_created"] == 2 and before["by_entity"]["us/USD"]["invoiced"] == "7.50"

    desk = review.load(s)
    review.decide(s, desk, "approve", [spike.line_id], None, "ann", "the customer confirmed the spike")
    review.decide(s, desk, "reject", [bogus.line_id], None, "ann", "a metering bug, credited by hand")
    wait_until(lambda: spike.line_id in in_tryton(client), 60, "the approved line in Tryton")
    out = invoice.close_period(s, "2026-03", post=True)
    assert out["differences"] == [] and out["held_for_review"] == 0 and out["invoices_created"] == 1
    assert {k: v["invoiced"] for k, v in out["by_entity"].items()} == {"eu/EUR": "907.00", "us/USD": "7.50"}
    fields = ["company.party.code", "currency.code", "untaxed_amount", "state"]
    invoices = client.call("model.account.invoice.search_read", [], 0, None, [("id", "ASC")], fields)
    assert [(i["company."]["party."]["code"], i["currency."]["code"], i["untaxed_amount"], i["state"]) for i in invoices] == [
        ("TF-US", "USD", D("7.50"), "draft"),
        ("TF-EU", "EUR", D("7.00"), "draft"),
        ("TF-EU", "EUR", D("900.00"), "posted"),
    ]
