"""Rated usage records (one per Tallyflow RatedUsageLine) and their invoicing."""

from __future__ import annotations

from decimal import Decimal
from itertools import groupby
from typing import Any

from sql import Null
from trytond.exceptions import UserError
from trytond.i18n import gettext
from trytond.model import Index, ModelSQL, ModelView, Unique, fields
from trytond.model.exceptions import AccessError
from trytond.modules.currency.fields import Monetary
from trytond.pool import Pool
from trytond.rpc import RPC
from trytond.transaction import Transaction, without_check_access

from . import common
from .common import Rejected
from .credit import APPLIED

CREDIT_PRODUCT = "TALLYFLOW-CREDIT"  # the product whose account books the credits applied


class Usage(ModelSQL, ModelView):  # type: ignore[misc]
    "Tallyflow Rated Usage"

    __name__ = "tallyflow.usage"
    _rec_name = "external_id"

    external_id = fields.Char("Line ID", required=True, readonly=True, help="Tallyflow line_id.")
    company = fields.Many2One("company.company", "Company", required=True, readonly=True)
    party = fields.Many2One("party.party", "Party", required=True, ondelete="RESTRICT")
    product = fields.Many2One("product.product", "Product", required=True, ondelete="RESTRICT")
    quantity = fields.Numeric("Quantity", required=True)
    currency = fields.Many2One("currency.currency", "Currency", required=True, ondelete="RESTRICT")
    amount = Monetary("Amount", currency="currency", digits="currency", required=True)
    period = fields.Char("Period", required=True, help="YYYY-MM")
    window_start = fields.DateTime("Window Start", required=True)
    window_end = fields.DateTime("Window End", required=True)
    revision = fields.Integer("Revision", required=True)
    pricing_version = fields.Char("Pricing Version")
    meter = fields.Char("Meter", required=True)
    tenant_id = fields.Char("Tenant", required=True)
    contract_id = fields.Char("Contract")
    event_count = fields.Integer("Events")
    invoice_line = fields.Many2One(
        "account.invoice.line",
        "Invoice Line",
        readonly=True,
        ondelete="SET NULL",
        help="Set when invoiced; an invoiced record is read-only.",
    )

    @classmethod
    def __setup__(cls) -> None:
        super().__setup__()
        t = cls.__table__()
        cls._sql_constraints += [
            ("external_id_unique", Unique(t, t.external_id), "tallyflow.msg_usage_external_id_unique"),
        ]
        cls._sql_indexes.update(
            {
                Index(t, (t.period, Index.Equality()), (t.party, Index.Equality())),
                Index(t, (t.invoice_line, Index.Range())),
            }
        )
        cls._order = [("period", "DESC"), ("id", "DESC")]
        cls.__rpc__.update(
            {
                "ingest": RPC(readonly=False, result=dict),
                "invoice_period": RPC(readonly=False),
            }
        )

    @classmethod
    def default_company(cls) -> int | None:
        company = Transaction().context.get("company")
        return int(company) if company else None

    @classmethod
    def check_modification(cls, mode: str, records: list[Any], values: Any = None, external: bool = False) -> None:
        super().check_modification(mode, records, values=values, external=external)
        if mode not in {"write", "delete"}:
            return
        # Only internal code may unlink (e.g. the SET NULL when a draft invoice is deleted).
        unlinking = mode == "write" and not external and values == {"invoice_line": None}
        for record in records:
            if record.invoice_line and not unlinking:
                raise AccessError(gettext("tallyflow.msg_usage_invoiced_readonly", usage=record.rec_name))

    @classmethod
    def copy(cls, records: list[Any], default: dict[str, Any] | None = None) -> list[Any]:
        raise AccessError("Tallyflow usage records cannot be copied.")

    # ---------------------------------------------------------------- ingest

    @classmethod
    def ingest(cls, lines: Any) -> dict[str, str]:
        """Store a micro-batch of RatedUsageLine dicts in one transaction.

        Returns {line_id: "created" | "existing" | "rejected: <reason>"}. A line is never
        stored twice: the unique constraint rejects a racing duplicate and the call is then
        retried by the dispatcher (see common.create_unique), so a batch may be replayed freely.
        """
        pool = Pool()
        Product = pool.get("product.product")
        Currency = pool.get("currency.currency")
        batch = common.check_batch(lines)
        company = common.company_id()

        outcomes, todo = common.new_items(cls, batch, "line_id")

        parties = common.find_parties(str(i.get("erp_customer_id")) for i in todo.values())
        products = {p.code: p for p in Product.search([("code", "in", sorted({str(i.get("product_code")) for i in todo.values()}))])}
        currencies = {c.code: c for c in Currency.search([])}
        companies = common.find_companies(todo.values())

        vlist, created = [], []
        for line_id, item in todo.items():
            try:
                company_ = common.item_company(item, company, companies)
                vlist.append(cls._ingest_values(item, company_, parties, products, currencies))
                created.append(line_id)
            except Rejected as exc:
                outcomes[line_id] = common.rejected(str(exc))
        common.create_unique(cls, vlist)
        outcomes.update(dict.fromkeys(created, common.CREATED))
        return outcomes

    @classmethod
    def _ingest_values(
        cls, item: dict[str, Any], company: int, parties: dict[str, Any], products: dict[str, Any], currencies: dict[str, Any]
    ) -> dict[str, Any]:
        reasons = []
        customer, code, ccy = (item.get(k) for k in ("erp_customer_id", "product_code", "currency"))
        party, product, currency = parties.get(str(customer)), products.get(str(code)), currencies.get(str(ccy))
        for key, value, found, hint in (
            ("erp_customer_id", customer, party, f"unknown customer {customer}: create the party with that code"),
            ("product_code", code, product, f"unknown product {code}: create the product with that code"),
            ("currency", ccy, currency, f"unknown currency {ccy}"),
        ):
            if not value:
                reasons.append(f"missing {key}")
            elif found is None:
                reasons.append(hint)
        values: dict[str, Any] = {}
        try:
            amount = common.decimal(item, "amount")
            if currency is not None and amount != currency.round(amount):
                raise Rejected(f"amount {amount} has more decimals than {currency.code} allows ({currency.digits})")
            period = common.text(item, "period")
            if not common.PERIOD_RE.match(period or ""):
                raise Rejected(f"invalid period {period!r}: expected YYYY-MM")
            values = {
                "external_id": item["line_id"],
                "company": company,
                "quantity": common.decimal(item, "quantity"),
                "amount": amount,
                "period": period,
                "window_start": common.timestamp(item, "window_start"),
                "window_end": common.timestamp(item, "window_end"),
                "revision": common.integer(item, "revision", 0),
                "pricing_version": common.text(item, "pricing_version", required=False),
                "meter": common.text(item, "meter"),
                "tenant_id": common.text(item, "tenant_id"),
                "contract_id": common.text(item, "contract_id", required=False),
                "event_count": common.integer(item, "event_count"),
            }
        except Rejected as exc:
            reasons.append(str(exc))
        if reasons or party is None or product is None or currency is None:
            raise Rejected("; ".join(reasons))
        values.update(party=party.id, product=product.id, currency=currency.id)
        return values

    # ------------------------------------------------------------- invoicing

    @classmethod
    def invoice_period(cls, period: Any, parties: list[str] | None = None, post: bool = False) -> list[dict[str, Any]]:
        """Create one customer invoice per company, party and currency with the period's records
        that are not invoiced yet: one line per product (quantity 1, unit price = the exact sum
        of its usage records) and one negative line per prepaid grant used (its drawn less its
        returned credit records), so the invoice total is gross - credits applied.

        Each company (a legal entity's, SPEC §10.2) invoices its own records, in its own
        context (accounts, payment term, fiscal year, numbering). Invoices stay draft unless
        post is true. Returns one dict per invoice."""
        pool = Pool()
        Credit = pool.get("tallyflow.credit")
        period = common.check_period(period)
        common.company_id()  # the caller's context, as for every call
        cls.lock()  # two concurrent calls must not invoice the same records
        Credit.lock()
        result = []
        companies = cls._companies_to_invoice(period)
        common.check_companies(companies)
        party_ids = None if parties is None else [p.id for p in common.find_parties(parties).values()]
        for company in companies:
            with Transaction().set_context(company=company):
                result.extend(cls._invoice_company(period, company, party_ids, post))
        return result

    @classmethod
    def _companies_to_invoice(cls, period: str) -> list[int]:
        """The companies with records of the period not invoiced yet (plain SQL: one row each)."""
        Credit = Pool().get("tallyflow.credit")
        cursor = Transaction().connection.cursor()
        found: set[int] = set()
        usage, credit = cls.__table__(), Credit.__table__()
        for t, where in (
            (usage, usage.invoice_line == Null),
            (credit, (credit.invoice == Null) & credit.kind.in_(list(APPLIED))),
        ):
            cursor.execute(*t.select(t.company, where=(t.period == period) & where, group_by=[t.company]))
            found.update(company for (company,) in cursor)
        return sorted(found)

    @classmethod
    def _invoice_company(cls, period: str, company: int, party_ids: list[int] | None, post: bool) -> list[dict[str, Any]]:
        pool = Pool()
        Invoice = pool.get("account.invoice")
        Credit = pool.get("tallyflow.credit")
        domain: list[Any] = [("period", "=", period), ("invoice_line", "=", None), ("company", "=", company)]
        credit_domain: list[Any] = [("period", "=", period), ("invoice", "=", None), ("company", "=", company), ("kind", "in", APPLIED)]
        if party_ids is not None:
            domain.append(("party", "in", party_ids))
            credit_domain.append(("party", "in", party_ids))
        records = cls.search(domain, order=[("party", "ASC"), ("currency", "ASC"), ("product", "ASC"), ("id", "ASC")])
        credits = Credit.search(credit_domain, order=[("party", "ASC"), ("currency", "ASC"), ("grant_id", "ASC"), ("id", "ASC")])

        groups: dict[tuple[int, int], tuple[list[Any], list[Any]]] = {}
        for r in records:
            groups.setdefault((r.party.id, r.currency.id), ([], []))[0].append(r)
        for c in credits:
            groups.setdefault((c.party.id, c.currency.id), ([], []))[1].append(c)

        plans = []
        for key in sorted(groups):
            usages, applied = groups[key]
            grants = [(gid, list(recs)) for gid, recs in groupby(applied, key=lambda c: c.grant_id)]
            if not usages and not any(sum((c.applied() for c in recs), Decimal(0)) for _, recs in grants):
                continue  # credits drawn and given back in full, nothing else: nothing to bill
            first = usages[0] if usages else applied[0]
            invoice = cls._get_invoice(first.party, first.currency, period)
            lines = []
            for product, per_product in groupby(usages, key=lambda r: r.product):
                group = list(per_product)
                lines.append((cls._get_invoice_line(invoice, product, group, period), group, []))
            for grant_id, recs in grants:
                net = sum((c.applied() for c in recs), Decimal(0))
                line = cls._get_credit_line(invoice, grant_id, net, recs, period) if net else None
                lines.append((line, [], recs))
            plans.append((invoice, lines))
        if not plans:
            return []

        Invoice.save([invoice for invoice, _ in plans])
        InvoiceLine = pool.get("account.invoice.line")
        InvoiceLine.save([line for _, lines in plans for line, _, _ in lines if line is not None])
        with without_check_access():
            args: list[Any] = []
            credit_args: list[Any] = []
            for invoice, lines in plans:
                for line, usages, recs in lines:
                    if usages:
                        args.extend((usages, {"invoice_line": line.id}))
                    if recs:
                        credit_args.extend((recs, {"invoice": invoice.id, "invoice_line": line.id if line else None}))
            if args:
                cls.write(*args)
            if credit_args:
                Credit.write(*credit_args)
        invoices = Invoice.browse([invoice.id for invoice, _ in plans])
        Invoice.update_taxes(invoices)

        result = []
        for invoice, (_, lines) in zip(invoices, plans, strict=True):
            gross = sum((u.amount for _, usages, _ in lines for u in usages), Decimal(0))
            applied_ = sum((c.applied() for _, _, recs in lines for c in recs), Decimal(0))
            if invoice.untaxed_amount != gross - applied_:
                raise UserError(
                    gettext(
                        "tallyflow.msg_invoice_mismatch", invoice=invoice.rec_name, total=invoice.untaxed_amount, expected=gross - applied_
                    )
                )
            result.append(
                {
                    "invoice": invoice.id,
                    "company": invoice.company.party.code or invoice.company.party.name,
                    "party": invoice.party.code,
                    "currency": invoice.currency.code,
                    "gross": gross,
                    "credits": applied_,
                    "untaxed_amount": invoice.untaxed_amount,
                    "tax_amount": invoice.tax_amount,
                    "total_amount": invoice.total_amount,
                    "lines": sum(1 for line, _, _ in lines if line is not None),
                    "records": sum(len(usages) for _, usages, _ in lines),
                    "credit_records": sum(len(recs) for _, _, recs in lines),
                    "grants": sum(1 for line, _, recs in lines if recs and line is not None),
                }
            )
        if post:
            Invoice.post(invoices)
            for row, invoice in zip(result, Invoice.browse(invoices), strict=True):
                row.update(state=invoice.state, number=invoice.number)
        else:
            for row in result:
                row["state"] = "draft"
        return result

    @classmethod
    def _get_invoice(cls, party: Any, currency: Any, period: str) -> Any:
        pool = Pool()
        Invoice = pool.get("account.invoice")
        Configuration = pool.get("account.configuration")
        invoice = Invoice(
            company=Transaction().context["company"],
            type="out",
            party=party,
            currency=currency,
            invoice_address=party.address_get(type="invoice"),
            account=party.account_receivable_used,
            description=f"Usage {period}",
            reference=f"tallyflow:{period}",
        )
        invoice.payment_term = party.customer_payment_term or Configuration(1).get_multivalue("default_customer_payment_term")
        invoice.set_journal()
        return invoice

    @classmethod
    def _get_invoice_line(cls, invoice: Any, product: Any, usages: list[Any], period: str) -> Any:
        InvoiceLine = Pool().get("account.invoice.line")
        amount = sum((u.amount for u in usages), Decimal(0))
        quantity = sum((u.quantity for u in usages), Decimal(0))
        line = InvoiceLine(invoice=invoice, type="line", product=product, company=invoice.company, currency=invoice.currency, quantity=1.0)
        line.on_change_product()
        # Quantity 1 and the exact sum as unit price: amount = round(1 * unit_price) is exact,
        # so Tryton never re-prices what Tallyflow rated.
        line.unit_price = amount
        line.description = f"{product.rec_name} {period}: {quantity.normalize():f} {usages[0].meter} ({len(usages)} records)"
        return line

    @classmethod
    def _get_credit_line(cls, invoice: Any, grant_id: str, applied: Decimal, records: list[Any], period: str) -> Any:
        """One line per grant used: minus what it covered this period, on the credit product
        (its account category says where prepaid credits applied are booked)."""
        pool = Pool()
        InvoiceLine = pool.get("account.invoice.line")
        Product = pool.get("product.product")
        products = Product.search([("code", "=", CREDIT_PRODUCT)], limit=1)
        if not products:
            raise UserError(gettext("tallyflow.msg_no_credit_product", period=period, code=CREDIT_PRODUCT))
        line = InvoiceLine(
            invoice=invoice, type="line", product=products[0], company=invoice.company, currency=invoice.currency, quantity=1.0
        )
        line.on_change_product()
        line.unit_price = -applied  # exact: quantity 1, and the records are in the currency's minor unit
        line.description = f"Prepaid credit {grant_id} applied, {period} ({len(records)} records)"
        return line
