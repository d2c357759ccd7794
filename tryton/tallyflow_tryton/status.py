"""Invoice states on the CRM side (SPEC §10.3): one `tallyflow.billing_status` record per
Tallyflow InvoiceStatus (its `status_id` UNIQUE, so a status sent again is `existing`), and
the party's latest billing status on the party itself, for the people who look at it."""

from __future__ import annotations

from typing import Any

from trytond.model import ModelSQL, ModelView, Unique, fields
from trytond.pool import Pool, PoolMeta
from trytond.rpc import RPC
from trytond.transaction import without_check_access

from . import common
from .common import Rejected

STATES = ("draft", "posted", "paid", "cancelled")


class BillingStatus(ModelSQL, ModelView):  # type: ignore[misc]
    "Tallyflow Billing Status"

    __name__ = "tallyflow.billing_status"
    _rec_name = "external_id"

    external_id = fields.Char("Status ID", required=True, readonly=True, help="Tallyflow status_id.")
    party = fields.Many2One("party.party", "Party", required=True, ondelete="CASCADE")
    invoice_ref = fields.Char("Invoice", required=True, readonly=True, help="The ERP's invoice id.")
    state = fields.Selection([(s, s.capitalize()) for s in STATES], "State", required=True, readonly=True)
    at = fields.DateTime("At", required=True, readonly=True, help="When the ERP reached the state.")
    amount = fields.Numeric("Amount", readonly=True)
    currency_code = fields.Char("Currency", readonly=True)
    tenant_id = fields.Char("Tenant", required=True, readonly=True)

    @classmethod
    def __setup__(cls) -> None:
        super().__setup__()
        t = cls.__table__()
        cls._sql_constraints += [
            ("external_id_unique", Unique(t, t.external_id), "tallyflow.msg_billing_status_id_unique"),
        ]
        cls._order = [("at", "DESC"), ("id", "DESC")]
        cls.__rpc__.update({"ingest": RPC(readonly=False, result=dict)})

    @classmethod
    def ingest(cls, statuses: Any) -> dict[str, str]:
        """Store InvoiceStatus dicts for the party of their `crm_account_id`, and set each
        party's latest billing status; {status_id: created|existing|rejected: ...}."""
        batch = common.check_batch(statuses)
        outcomes, todo = common.new_items(cls, batch, "status_id")
        parties = common.find_parties(str(i.get("crm_account_id")) for i in todo.values())
        vlist, created = [], []
        for status_id, item in todo.items():
            try:
                account = common.text(item, "crm_account_id")
                party = parties.get(account or "")
                if party is None:
                    raise Rejected(f"unknown CRM account {account}: create the party with that code")
                state = common.text(item, "state")
                if state not in STATES:
                    raise Rejected(f"unknown state {state!r}: expected one of {', '.join(STATES)}")
                amount = item.get("amount")
                vlist.append(
                    {
                        "external_id": status_id,
                        "party": party.id,
                        "invoice_ref": common.text(item, "invoice_id"),
                        "state": state,
                        "at": common.timestamp(item, "at"),
                        "amount": None if amount is None else common.decimal(item, "amount"),
                        "currency_code": common.text(item, "currency", required=False),
                        "tenant_id": common.text(item, "tenant_id"),
                    }
                )
                created.append(status_id)
            except Rejected as exc:
                outcomes[status_id] = common.rejected(str(exc))
        records = common.create_unique(cls, vlist)
        outcomes.update(dict.fromkeys(created, common.CREATED))
        cls._latest_on_parties(records)
        return outcomes

    @classmethod
    def _latest_on_parties(cls, records: list[Any]) -> None:
        """Each party shows the newest state any of its invoices reached."""
        Party = Pool().get("party.party")
        newest: dict[int, Any] = {}
        for r in records:
            cur = newest.get(r.party.id)
            if cur is None or r.at > cur.at:
                newest[r.party.id] = r
        for party_id, r in newest.items():
            party = Party(party_id)
            if party.tallyflow_billing_at is None or r.at >= party.tallyflow_billing_at:
                with without_check_access():  # read-only for people: only Tallyflow sets it
                    Party.write([party], {"tallyflow_billing_status": f"{r.invoice_ref}: {r.state}", "tallyflow_billing_at": r.at})


class Party(metaclass=PoolMeta):  # type: ignore[metaclass]
    __name__ = "party.party"

    tallyflow_billing_status = fields.Char("Billing Status", readonly=True, help="The newest invoice state Tallyflow told.")
    tallyflow_billing_at = fields.DateTime("Billing Status At", readonly=True)
