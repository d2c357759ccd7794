"""`tallyflow demo --erp tryton`: the whole story against a real ERP and CRM.

Tryton (SQLite, the Tallyflow module) is set up from the catalog (a company per legal entity
-- TF-US in USD, TF-EU in EUR -- each with its chart, fiscal years and a cash payment
method, a product per `product_code`, a party per tenant; ~40 s the first time, then kept),
served on loopback, and is both the ERP (usage records) and the CRM (leads, billing
statuses); the success tool stays the sandbox's webhook. Traffic for fewer tenants than
`make demo` (Tryton on SQLite takes ~2,000 lines/s), and halfway through the Tryton process
is stopped: ERP posting and CRM leads wait in Kafka, success-tool alerts go on.

The finance controls of SPEC §10 on top: the pipeline's catalog gains a review rule (a line
over 5,000 in its currency waits for a person), and two tenants' usage spikes: the US
tenant's held line is approved and posted, the EU tenant's rejected and parked. After
everything is delivered each period is invoiced and posted per company, one invoice is paid
in Tryton, and every state goes back to the CRM; the table compares, per entity, what
Tallyflow rated, what Tryton recorded and what it invoiced.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import orjson

from devkit.demo import DEMO_ENV, DEMO_START, _row
from devkit.generator import GenSpec, produce
from devkit.pipeline import LocalPipeline, wait_until
from devkit.tryton import TrytonServer, template
from devkit.tryton_setup import ADMIN_LOGIN, ADMIN_PASSWORD, PAYMENT_METHOD
from ops.invoice import close_period
from ops.status import TrytonInvoices
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import Settings, load_settings
from schemas.catalog import load_catalog
from schemas.outputs import RatedUsageLine, ThresholdAlert
from sinks.tryton import TrytonClient
from state import review

REVIEW_LIMIT = Decimal("5000.00")  # per line, in USD and in EUR
# (tenant, tokens, decision): a pro tenant of TF-US whose spike is approved, an enterprise
# tenant of TF-EU whose spike is rejected; 15 minutes into November.
SPIKES = (("t-0003", 500_000_000, "approve"), ("t-0010", 800_000_000, "reject"))


def _count(client: TrytonClient, model: str, domain: list[object]) -> int:
    return int(client.call(f"model.{model}.search_count", domain))


def _outage(tryton: TrytonServer, after_s: float, seconds: float, log: dict[str, float]) -> None:
    time.sleep(after_s)  # the demo's script: halfway through the traffic
    tryton.stop()
    log["down"] = time.time()
    print(f"\n  >>> Tryton process STOPPED for {seconds:g}s (ERP and CRM down)", flush=True)
    time.sleep(seconds)
    tryton.start()
    log["up"] = time.time()
    print("\n  >>> Tryton back UP", flush=True)


def run(args: argparse.Namespace) -> int:
    print("tallyflow demo --erp tryton: setting up Tryton from the catalog (~40 s the first time) ...", flush=True)
    default = load_settings({}).process.catalog  # the embedded default: its parties, products and entities
    tpl = template(default)
    env = {**DEMO_ENV, "TALLYFLOW_ERP_KIND": "tryton", "TALLYFLOW_CRM_KIND": "tryton", "TALLYFLOW_CATALOG": _with_review(default)}
    with LocalPipeline(env) as lp:
        tryton = TrytonServer(tpl, Path(lp.logdir) / "tryton").start()
        try:
            lp.settings = tryton.settings(lp.settings)  # what the dataflows it starts are given
            return _story(lp, tryton, args)
        finally:
            tryton.stop()


def _with_review(catalog: str) -> str:
    """The catalog with the demo's review rule (SPEC §10.1), in a file of its own."""
    path = Path(tempfile.mkdtemp(prefix="tallyflow-demo-")) / "catalog.yaml"
    rule = f'\nreview:\n  line_amount_over: {{USD: "{REVIEW_LIMIT}", EUR: "{REVIEW_LIMIT}"}}\n'
    path.write_text(Path(catalog).read_text() + rule)
    return str(path)


def _spikes(s: Settings) -> int:
    """Each spike: one call of a huge number of tokens, 15 minutes into November."""
    at = (DEMO_START + timedelta(minutes=45)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    p = kafka.producer(s.kafka.config())
    for tenant, tokens, _ in SPIKES:
        ev = {"specversion": "1.0", "id": f"spike-{tenant}", "source": "svc/llm", "type": "llm.tokens", "subject": tenant, "time": at}
        p.produce(s.topics.input, orjson.dumps({**ev, "data": {"tokens": tokens}}), tenant.encode())
    if p.flush(30):
        raise RuntimeError("the spikes were not produced")
    return len(SPIKES)


def _story(lp: LocalPipeline, tryton: TrytonServer, args: argparse.Namespace) -> int:
    s: Settings = lp.settings
    lp.start_all()
    print(f"  broker {s.kafka.brokers}, redis {s.stores.redis_url}, Tryton {tryton.url} database {tryton.database}", flush=True)
    spec = GenSpec(total=args.events, tenants=args.tenants, seed=args.seed, start=DEMO_START, span=timedelta(hours=1), rate=args.rate)
    outage: dict[str, float] = {}
    script = threading.Thread(target=_outage, args=(tryton, spec.total / args.rate / 2, args.outage, outage), daemon=True)
    spiked = _spikes(s)
    print(f"generating {spec.total:,} events for {spec.tenants:,} tenants at {args.rate:,.0f}/s ...", flush=True)
    script.start()
    gen = produce(s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog), progress=sys.stderr.isatty())
    script.join()
    print(f"  produced {gen.produced:,}; waiting for rating, then for the review desk and Tryton ...", flush=True)
    lp.wait_rated(gen.produced + spiked, 180)

    lines = {ln.line_id: ln for ln in (msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated))}
    alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
    leads_wanted = len({a.alert_id for a in alerts if "crm" in a.destinations})
    held = [ln for ln in lines.values() if ln.review is not None]
    approved, rejected = _decide(s, held)
    client = tryton.client(s)
    t0 = time.time()
    posted = len(lines) - len(rejected)
    wait_until(lambda: _count(client, "tallyflow.usage", []) >= posted, 600, "every rated line not rejected in Tryton")
    wait_until(lambda: _count(client, "sale.opportunity", [("tallyflow_alert_id", "!=", None)]) >= leads_wanted, 300, "every lead")
    drained = time.time() - t0

    print("\nsummary: Tryton as ERP and CRM, two legal entities")
    print(
        _row("Tryton outage", f"{outage['up'] - outage['down']:.1f}s (process stopped); backlog drained {drained:.1f}s after rating ended")
    )
    corrections = sum(1 for ln in lines.values() if ln.revision)
    print(_row("rated lines (usage.rated)", f"{len(lines):,} ({corrections:,} corrections with signed deltas)"))
    review_ok = _show_review(s, client, held, approved, rejected)
    usage = _count(client, "tallyflow.usage", [])
    print(_row("usage records in Tryton", f"{usage:,} (rated less rejected: {posted:,})"))
    leads = _count(client, "sale.opportunity", [("tallyflow_alert_id", "!=", None)])
    print(_row("threshold alerts -> leads in Tryton", f"{leads_wanted:,} -> {leads:,}"))

    periods = sorted({ln.period for ln in lines.values()})
    closed = [close_period(s, p, post=True) for p in periods]
    totals: dict[str, dict[str, Decimal]] = {}
    for out in closed:
        for key, t in out["by_entity"].items():
            acc = totals.setdefault(key, {"rated": Decimal(0), "in_tryton": Decimal(0), "invoiced": Decimal(0)})
            for k in acc:
                acc[k] += Decimal(t[k])
    dups = sum(out["duplicate_line_ids"] for out in closed)
    differences = sum(len(out["differences"]) + out["held_for_review"] for out in closed)
    invoices = sum(out["invoices_created"] for out in closed)
    print(_row("periods invoiced and posted", f"{', '.join(periods)}: {invoices:,} invoices (per company, customer, currency, period)"))
    print(f"\n  {'entity/currency':<16}{'rated by Tallyflow':>22}{'records in Tryton':>22}{'Tryton invoices':>22}")
    for key, t in sorted(totals.items()):
        print(f"  {key:<16}{t['rated']:>22,}{t['in_tryton']:>22,}{t['invoiced']:>22,}")
    print()
    print(_row("duplicate line ids in Tryton", dups))
    print(_row("customers whose totals differ", differences))
    statuses_ok = _statuses(s, client, tryton)
    equal = len(totals) == 2 and all(t["rated"] == t["in_tryton"] == t["invoiced"] for t in totals.values())
    ok = equal and usage == posted and dups == 0 and differences == 0 and review_ok and statuses_ok
    print(_row("verdict", "OK" if ok else "MISMATCH"))
    return 0 if ok else 1


def _decide(s: Settings, held: list[RatedUsageLine]) -> tuple[list[str], list[str]]:
    """A person at the review desk: the rejected spike's lines rejected, every other held
    line approved (`tallyflow review approve|reject`, here through the same code)."""
    reject = {tenant for tenant, _, decision in SPIKES if decision == "reject"}
    ids = {ln.line_id for ln in held}
    wait_until(lambda: ids <= set(review.load(s).held), 120, f"the {len(ids)} held lines on the review topic")
    desk = review.load(s)
    no = [ln.line_id for ln in held if ln.tenant_id in reject]
    yes = [ln.line_id for ln in held if ln.tenant_id not in reject]
    if yes:
        review.decide(s, desk, "approve", yes, None, "demo-controller", "the customer confirmed the usage")
    if no:
        review.decide(s, desk, "reject", no, None, "demo-controller", "a runaway job: the customer is not billed for it")
    return yes, no


def _show_review(s: Settings, client: TrytonClient, held: list[RatedUsageLine], approved: list[str], rejected: list[str]) -> bool:
    """Held, approved (in Tryton once), rejected (parked on the exceptions topic, not in Tryton)."""
    for ln in held:
        print(_row(f"held for review: {ln.tenant_id}", f"{ln.currency} {ln.amount:,} ({ln.review})"))
    booked = {
        r["external_id"]
        for r in client.call(
            "model.tallyflow.usage.search_read", [("external_id", "in", approved + rejected)], 0, None, None, ["external_id"]
        )
    }

    parked: set[str] = set()

    def all_parked() -> bool:
        parked.update(i for v in read_topic(s.kafka.config(), s.topics.exceptions) for i in orjson.loads(v).get("ids", ()))
        return set(rejected) <= parked

    wait_until(all_parked, 60, "the rejected lines parked")
    print(_row("approved -> in Tryton", f"{len(approved)} -> {len(booked & set(approved))}"))
    print(
        _row(
            "rejected -> parked, not in Tryton",
            f"{len(rejected)} -> {len(parked & set(rejected))} parked, {len(booked & set(rejected))} in Tryton",
        )
    )
    spiked = {ln.tenant_id for ln in held}
    return spiked >= {t for t, _, _ in SPIKES} and booked == set(approved) and bool(approved and rejected)


def _pay_one(tryton: TrytonServer) -> str:
    """An accountant records a payment of the first posted invoice in Tryton (its pay wizard
    over XML-RPC, in the invoice's company, with the company's cash payment method)."""
    from proteus import Model, Wizard
    from proteus import config as pconfig

    host = tryton.url.split("//", 1)[1]
    cfg = pconfig.set_xmlrpc(f"http://{ADMIN_LOGIN}:{ADMIN_PASSWORD}@{host}/{tryton.database}/rpc/")
    Invoice = Model.get("account.invoice")
    (first,) = Invoice.find([("state", "=", "posted")], order=[("id", "ASC")], limit=1)
    with cfg.set_context(company=first.company.id):
        invoice = Invoice(first.id)
        (method,) = Model.get("account.invoice.payment.method").find([("company", "=", invoice.company.id), ("name", "=", PAYMENT_METHOD)])
        pay = Wizard("account.invoice.pay", [invoice])
        pay.form.payment_method = method
        pay.execute("choice")
        invoice.reload()
        return f"{invoice.number} of {invoice.company.rec_name} ({invoice.currency.code} {invoice.total_amount:,}): {invoice.state}"


def _statuses(s: Settings, client: TrytonClient, tryton: TrytonServer) -> bool:
    """Invoice states back to the CRM (SPEC §10.3): the poller tells the posted invoices, an
    accountant pays one, the poller tells that too, and `deliver status` (running since the
    start) makes each state a billing status of the party in Tryton's CRM, once."""
    poller = TrytonInvoices(s)
    try:
        first = poller.once()
        paid = _pay_one(tryton)
        second = poller.once()
    finally:
        poller.close()
    told, parked = first["told"] + second["told"], first["parked"] + second["parked"]
    wait_until(lambda: _count(client, "tallyflow.billing_status", []) >= told, 120, "every invoice state at the CRM's parties")
    at_crm = _count(client, "tallyflow.billing_status", [])
    paid_at_crm = _count(client, "tallyflow.billing_status", [("state", "=", "paid")])
    print(_row("invoice paid in Tryton", paid))
    print(_row("invoice states -> CRM parties", f"{told:,} told on erp.status (posted, then paid) -> {at_crm:,} billing statuses"))
    return at_crm == told and parked == 0 and paid.endswith("paid") and paid_at_crm == 1
