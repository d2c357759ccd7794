"""The credit ledger in Tryton: one record per Tallyflow CreditRecord (usage.credits).

Tryton has no idempotency keys, so a record carries its `record_id` under a UNIQUE
constraint and `ingest` answers each `created`, `existing` or `rejected: why`, exactly as
usage records do by `line_id`. The `drawn` and `returned` records of a period are the
credits applied to it; `invoice_period` (on `tallyflow.usage`) puts one negative line per
grant used (drawn - returned) on the customer's invoice beside the gross usage lines.
"""

from __future__ import annotations

from typing import Any

from trytond.i18n import gettext
from trytond.model import Index, ModelSQL, ModelView, Unique, fields
from trytond.model.exceptions import AccessError
from trytond.modules.currency.fields import Monetary
from trytond.pool import Pool
from trytond.rpc import RPC
from trytond.transaction import Transaction

from . import common
from .common import Rejected

KINDS = ("granted", "drawn", "returned", "expired", "voided")
APPLIED = ("drawn", "returned")  # the kinds that move money on an invoice


class Credit(ModelSQL, ModelView):  # type: ignore[misc]
    "Tallyflow Credit Record"

    __name__ = "tallyflow.credit"
    _rec_name = "external_id"

    external_id = fields.Char("Record ID", required=True, readonly=True, help="Tallyflow record_id.")
    company = fields.Many2One("company.company", "Company", required=True, readonly=True)
    party = fields.Many2One("party.party", "Party", required=True, ondelete="RESTRICT")
    kind = fields.Selection([(k, k.capitalize()) for k in KINDS], "Kind", required=True)
    grant_id = fields.Char("Grant", required=True)
    currency = fields.Many2One("currency.currency", "Currency", required=True, ondelete="RESTRICT")
    amount = Monetary(
        "Amount", currency="currency", digits="currency", required=True, help="Positive; the kind says which way it moves the grant."
    )
    at = fields.DateTime("At", required=True)
    period = fields.Char("Period", help="YYYY-MM; drawn and returned records: the line's billing period.")
    line_id = fields.Char("Line ID", help="Drawn and returned records: the rated line that did it.")
    tenant_id = fields.Char("Tenant", required=True)
    seq = fields.Integer("Sequence", required=True, help="> 1: a correction of the difference after a crash replay.")
    invoice = fields.Many2One("account.invoice", "Invoice", readonly=True, ondelete="SET NULL")
    invoice_line = fields.Many2One("account.invoice.line", "Invoice Line", readonly=True, ondelete="SET NULL")

    @classmethod
    def __setup__(cls) -> None:
        super().__setup__()
        t = cls.__table__()
        cls._sql_constraints += [
            ("external_id_unique", Unique(t, t.external_id), "tallyflow.msg_credit_external_id_unique"),
        ]
        cls._sql_indexes.update(
            {
                Index(t, (t.period, Index.Equality()), (t.party, Index.Equality())),
                Index(t, (t.invoice, Index.Range())),
            }
        )
        cls._order = [("at", "DESC"), ("id", "DESC")]
        cls.__rpc__.update({"ingest": RPC(readonly=False, result=dict)})

    @classmethod
    def default_company(cls) -> int | None:
        company = Transaction().context.get("company")
        return int(company) if company else None

    @classmethod
    def default_seq(cls) -> int:
        return 1

    @classmethod
    def check_modification(cls, mode: str, records: list[Any], values: Any = None, external: bool = False) -> None:
        super().check_modification(mode, records, values=values, external=external)
        if mode not in {"write", "delete"}:
            return
        # Only internal code may unlink (the SET NULL when a draft invoice or its line is deleted).
        unlinking = mode == "write" and not external and bool(values) and set(values) <= {"invoice", "invoice_line"}
        unlinking = unlinking and all(v is None for v in values.values())
        for record in records:
            if record.invoice and not unlinking:
                raise AccessError(gettext("tallyflow.msg_credit_invoiced_readonly", credit=record.rec_name))

    @classmethod
    def copy(cls, records: list[Any], default: dict[str, Any] | None = None) -> list[Any]:
        raise AccessError("Tallyflow credit records cannot be copied.")

    @classmethod
    def ingest(cls, records: Any) -> dict[str, str]:
        """Store a micro-batch of CreditRecord dicts in one transaction.

        Returns {record_id: "created" | "existing" | "rejected: <reason>"}; a record is never
        stored twice (see `common.create_unique`), so a batch may be replayed freely."""
        pool = Pool()
        Currency = pool.get("currency.currency")
        batch = common.check_batch(records)
        company = common.company_id()

        outcomes, todo = common.new_items(cls, batch, "record_id")

        parties = common.find_parties(str(i.get("erp_customer_id")) for i in todo.values())
        currencies = {c.code: c for c in Currency.search([])}
        companies = common.find_companies(todo.values())
        vlist, created = [], []
        for record_id, item in todo.items():
            try:
                vlist.append(cls._ingest_values(item, common.item_company(item, company, companies), parties, currencies))
                created.append(record_id)
            except Rejected as exc:
                outcomes[record_id] = common.rejected(str(exc))
        common.create_unique(cls, vlist)
        outcomes.update(dict.fromkeys(created, common.CREATED))
        return outcomes

    @classmethod
    def _ingest_values(cls, item: dict[str, Any], company: int, parties: dict[str, Any], currencies: dict[str, Any]) -> dict[str, Any]:
        reasons = []
        customer, ccy = item.get("erp_customer_id"), item.get("currency")
        party, currency = parties.get(str(customer)), currencies.get(str(ccy))
        for key, value, found, hint in (
            ("erp_customer_id", customer, party, f"unknown customer {customer}: create the party with that code"),
            ("currency", ccy, currency, f"unknown currency {ccy}"),
        ):
            if not value:
                reasons.append(f"missing {key}")
            elif found is None:
                reasons.append(hint)
        values: dict[str, Any] = {}
        try:
            kind = common.text(item, "kind")
            if kind not in KINDS:
                raise Rejected(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
            amount = common.decimal(item, "amount")
            if currency is not None and amount != currency.round(amount):
                raise Rejected(f"amount {amount} has more decimals than {currency.code} allows ({currency.digits})")
            period = common.text(item, "period", required=kind in APPLIED)
            if period is not None and not common.PERIOD_RE.match(period):
                raise Rejected(f"invalid period {period!r}: expected YYYY-MM")
            values = {
                "external_id": item["record_id"],
                "company": company,
                "kind": kind,
                "grant_id": common.text(item, "grant_id"),
                "amount": amount,
                "at": common.timestamp(item, "at"),
                "period": period,
                "line_id": common.text(item, "line_id", required=kind in APPLIED),
                "tenant_id": common.text(item, "tenant_id"),
                "seq": common.integer(item, "seq", 1),
            }
        except Rejected as exc:
            reasons.append(str(exc))
        if reasons or party is None or currency is None:
            raise Rejected("; ".join(reasons))
        values.update(party=party.id, currency=currency.id)
        return values

    def applied(self) -> Any:
        """What this record takes off an invoice: drawn counts, returned gives back."""
        return self.amount if self.kind == "drawn" else -self.amount if self.kind == "returned" else 0
