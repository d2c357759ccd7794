"""A Tryton 8.2 SQLite database with the Tallyflow module and a ready-to-invoice set-up:
a company per legal entity of the catalog (else one), each with its chart of accounts,
fiscal years, payment term and cash payment method; currencies (USD, EUR), one service
product per `product_code` of the catalog and one for prepaid credits applied
(`TALLYFLOW-CREDIT`), one party per tenant (code: its `erp_customer_id`, identifier: its
`crm_account_id`, so the ERP and CRM adapters both find it).

    python -m devkit.tryton_setup /tmp/erp/tallyflow.sqlite CATALOG

Runs in a process of its own (proteus initialises trytond for the whole process). The
database name is the file name without ".sqlite"; a copy of the finished file
(`copy_database`) under another name is an independent database.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ADMIN_LOGIN = "admin"
ADMIN_PASSWORD = "tallyflow-admin"
ADMIN_EMAIL = "admin@example.com"
MODULE = "tallyflow"
CREDIT_PRODUCT = "TALLYFLOW-CREDIT"  # as in tryton/tallyflow_tryton/usage.py
CURRENCIES = {"USD": ("U.S. Dollar", "$", Decimal(1)), "EUR": ("Euro", "€", Decimal("0.9"))}


@dataclass
class SetupResult:
    database: str
    db_path: Path
    config_file: Path
    companies: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def write_config(db_dir: Path, config_file: Path, listen: str | None = None) -> Path:
    """A trytond config for the SQLite databases in db_dir (and the HTTP address if given)."""
    lines = ["[database]", "uri = sqlite://", f"path = {db_dir}", "language = en", ""]
    if listen:
        lines += ["[web]", f"listen = {listen}", ""]
    config_file.write_text("\n".join(lines))
    return config_file


def create_database(db_path: Path, password: str = ADMIN_PASSWORD) -> Path:
    """Empty file + `trytond-admin -u tallyflow --activate-dependencies`; returns the config."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    if db_path.exists():
        raise FileExistsError(db_path)
    db_path.touch()  # the SQLite backend refuses a database whose file does not exist
    config_file = write_config(db_path.parent, db_path.with_suffix(".conf"))
    with tempfile.NamedTemporaryFile("w", suffix=".pass", delete=False) as passfile:
        passfile.write(password + "\n")
    try:
        subprocess.run(
            [
                str(Path(sys.executable).with_name("trytond-admin")),
                "-c",
                str(config_file),
                "-d",
                db_path.stem,
                "-u",
                MODULE,
                "--activate-dependencies",
                "--email",
                ADMIN_EMAIL,
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**os.environ, "TRYTONPASSFILE": passfile.name},
        )
    except subprocess.CalledProcessError as exc:
        db_path.unlink(missing_ok=True)
        raise RuntimeError(f"trytond-admin failed:\n{exc.stderr[-4000:]}") from exc
    finally:
        os.unlink(passfile.name)
    return config_file


@dataclass(frozen=True)
class CompanySpec:
    """A company to set up: a legal entity's (its party's code is the entity's `erp_company`,
    which is how the Tallyflow module finds it) or, for a catalog without entities, the one
    company every line goes under."""

    code: str | None
    name: str
    currency: str


DEFAULT_COMPANY = CompanySpec(None, "Tallyflow Demo Company", "USD")
PAYMENT_METHOD = "Cash"  # per company: how `pay` (the demo's paid invoice) settles an invoice


def configure(
    database: str,
    config_file: Path,
    product_codes: Sequence[str],
    parties: Sequence[tuple[str, str]],
    aliases: Mapping[str, Sequence[str]],
    today: dt.date,
    companies: Sequence[CompanySpec] = (DEFAULT_COMPANY,),
) -> list[int]:
    """Companies, currencies, a chart, fiscal years, payment term, a cash payment method and
    the products' accounts per company; products and parties (shared). The admin user works
    for every company (company filter "all"), the first being its own. Returns the company
    ids (proteus, in this process)."""
    from proteus import Model, Wizard
    from proteus import config as pconfig

    cfg = pconfig.set_trytond(database=database, config_file=str(config_file))

    Currency = Model.get("currency.currency")
    currencies = {}
    for code, (name, symbol, rate) in CURRENCIES.items():
        currency = Currency(name=name, symbol=symbol, code=code, rounding=Decimal("0.01"), digits=2)
        currency.rates.new(date=dt.date(2000, 1, 1), rate=rate)
        currency.save()
        currencies[code] = currency

    Party = Model.get("party.party")
    Company = Model.get("company.company")
    company_parties = [Party(name=c.name, code=c.code) for c in companies]
    Party.save(company_parties)
    wizard = Wizard("company.company.config")
    wizard.execute("company")
    wizard.form.party = company_parties[0]
    wizard.form.currency = currencies[companies[0].currency]
    wizard.execute("add")
    User = Model.get("res.user")
    cfg._context = User.get_preferences(True, {})  # every later call runs in the company context
    records = [Company.find([("party", "=", company_parties[0].id)])[0]]
    for spec, party in zip(companies[1:], company_parties[1:], strict=True):
        company = Company(party=party, currency=currencies[spec.currency])
        company.save()
        records.append(company)
    if len(records) > 1:
        admin = User(cfg.user)
        admin.companies.extend(Company(c.id) for c in records[1:])
        admin.company_filter = "all"  # its records of every company, each invoiced in its own context
        admin.save()
        cfg._context = User.get_preferences(True, {})

    PaymentTerm = Model.get("account.invoice.payment_term")
    term = PaymentTerm(name="Due on receipt")
    term.lines.new(type="remainder")
    term.save()
    Category = Model.get("product.category")
    category = Category(name="Tallyflow usage", accounting=True)
    category.save()
    for company in records:
        with cfg.set_context(company=company.id):
            _configure_company(company, cfg, today, term, category)

    (unit,) = Model.get("product.uom").find([("name", "=", "Unit")])
    Template = Model.get("product.template")
    templates = [
        Template(name=code, code=code, type="service", default_uom=unit, list_price=Decimal(0), account_category=category)
        for code in product_codes
    ]
    # The product the invoice's negative line per grant used goes on (`tallyflow.usage`
    # CREDIT_PRODUCT); in production its account category books credits applied, typically
    # against deferred revenue. Here it shares the usage category's accounts.
    templates.append(
        Template(
            name="Prepaid credit applied",
            code=CREDIT_PRODUCT,
            type="service",
            default_uom=unit,
            list_price=Decimal(0),
            account_category=category,
        )
    )
    Template.save(templates)

    party_records = []
    for code, name in parties:
        party = Party(name=name, code=code)
        for alias in aliases.get(code, ()):
            party.identifiers.new(code=alias)
        party_records.append(party)
    Party.save(party_records)
    return [int(c.id) for c in records]


def _configure_company(company: Any, cfg: Any, today: dt.date, term: Any, category: Any) -> None:
    """What each company needs of its own to invoice and be paid (in its context): a chart,
    fiscal years, the default payment term, the usage category's accounts, a payment method."""
    from proteus import Model

    accounts = _create_chart(company, cfg)
    for year in (today.year - 1, today.year):
        _create_fiscalyear(company, year)
    account_config = Model.get("account.configuration")(1)
    account_config.default_customer_payment_term = Model.get("account.invoice.payment_term")(term.id)
    account_config.save()
    category = Model.get("product.category")(category.id)
    category.account_revenue = accounts["revenue"]
    category.account_expense = accounts["expense"]
    category.save()
    (journal,) = Model.get("account.journal").find([("type", "=", "cash")], limit=1)
    (cash,) = Model.get("account.account").find([("company", "=", company.id), ("code", "=", "1.1.1")], limit=1)
    method = Model.get("account.invoice.payment.method")(
        name=PAYMENT_METHOD, company=company, journal=journal, credit_account=cash, debit_account=cash
    )
    method.save()


def _create_chart(company: Any, cfg: Any) -> dict[str, Any]:
    from proteus import Model, Wizard

    template_id = Model.get("ir.model.data").get_id("account", "account_template_root_en", cfg.context)
    wizard = Wizard("account.create_chart")
    wizard.execute("account")
    wizard.form.account_template = Model.get("account.account.template")(template_id)
    wizard.form.company = company
    wizard.execute("create_account")
    Account = Model.get("account.account")
    accounts = {
        kind: Account.find([(f"type.{kind}", "=", True), ("company", "=", company.id), ("closed", "!=", True)], limit=1)[0]
        for kind in ("receivable", "payable", "revenue", "expense")
    }
    wizard.form.account_receivable = accounts["receivable"]
    wizard.form.account_payable = accounts["payable"]
    wizard.form.category_account_revenue = accounts["revenue"]
    wizard.form.category_account_expense = accounts["expense"]
    wizard.execute("create_properties")
    return accounts


def _create_fiscalyear(company: Any, year: int) -> None:
    from proteus import Model

    SequenceStrict = Model.get("ir.sequence.strict")
    SequenceType = Model.get("ir.sequence.type")
    (move_type,) = SequenceType.find([("name", "=", "Account Move")], limit=1)
    (invoice_type,) = SequenceType.find([("name", "=", "Invoice")], limit=1)
    move_seq = SequenceStrict(name=f"Moves {year}", sequence_type=move_type, company=company)
    move_seq.save()
    invoice_seq = SequenceStrict(name=f"Invoices {year}", sequence_type=invoice_type, company=company, prefix=f"INV/{year}/")
    invoice_seq.save()
    FiscalYear = Model.get("account.fiscalyear")
    fiscalyear = FiscalYear(
        name=str(year), start_date=dt.date(year, 1, 1), end_date=dt.date(year, 12, 31), company=company, move_sequence=move_seq
    )
    (seq,) = fiscalyear.invoice_sequences
    seq.out_invoice_sequence = seq.in_invoice_sequence = invoice_seq
    seq.out_credit_note_sequence = seq.in_credit_note_sequence = invoice_seq
    fiscalyear.save()
    fiscalyear.click("create_period")


def copy_database(source: str | Path, target: str | Path) -> Path:
    """Copy a Tryton SQLite database to target (its name is the file stem) with SQLite's backup
    API: Tryton runs SQLite in WAL mode, so while any process (even this one, after setup()) may
    still hold a connection, recent commits can live in the -wal file and a plain file copy could
    miss them. With no open connection a plain copy is equivalent (and as fast)."""
    target = Path(target)
    if target.exists():
        raise FileExistsError(target)
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return target


def setup(
    db_path: str | Path,
    product_codes: Sequence[str],
    parties: Sequence[tuple[str, str]],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    today: dt.date | None = None,
    companies: Sequence[CompanySpec] = (DEFAULT_COMPANY,),
) -> SetupResult:
    """Create db_path (must not exist) and configure it; see the module docstring."""
    db_path = Path(db_path).resolve()
    timings: dict[str, float] = {}
    started = time.monotonic()
    config_file = create_database(db_path)
    timings["create_database"] = time.monotonic() - started
    started = time.monotonic()
    ids = configure(db_path.stem, config_file, product_codes, parties, aliases or {}, today or dt.date.today(), companies)
    timings["configure"] = time.monotonic() - started
    conn = sqlite3.connect(db_path)
    try:  # fold the WAL into the main file (best effort: this process may still hold connections)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return SetupResult(db_path.stem, db_path, config_file, ids, timings)


def setup_from_catalog(db_path: str | Path, catalog_path: str | Path) -> SetupResult:
    """Products, parties and companies (one per legal entity, else one) from a catalog file."""
    from schemas.catalog import load_catalog

    cat = load_catalog(catalog_path)
    products = sorted({pm.product_code for p in cat.plans for pm in p.meters.values()})
    parties = [(t.erp_customer_id, t.tenant_id) for t in cat.tenants]
    aliases = {t.erp_customer_id: [t.crm_account_id] for t in cat.tenants if t.crm_account_id != t.erp_customer_id}
    companies = [CompanySpec(e.erp_company, e.name, e.currency) for e in cat.entities] or [DEFAULT_COMPANY]
    return setup(db_path, products, parties, aliases=aliases, companies=companies)


def main(argv: Sequence[str]) -> int:
    result = setup_from_catalog(argv[0], argv[1])
    print(f"{result.database} {result.db_path} {','.join(map(str, result.companies))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
