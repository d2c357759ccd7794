"""Tallyflow threshold alerts as sale.opportunity leads, at most one per alert_id."""

from __future__ import annotations

from typing import Any

from trytond.model import Unique, fields
from trytond.pool import Pool, PoolMeta
from trytond.rpc import RPC
from trytond.transaction import Transaction

from . import common
from .common import Rejected


class SaleOpportunity(metaclass=PoolMeta):  # type: ignore[metaclass]
    __name__ = "sale.opportunity"

    tallyflow_alert_id = fields.Char("Tallyflow Alert ID", readonly=True)
    tallyflow_correlation_id = fields.Char("Tallyflow Correlation ID", readonly=True)
    tallyflow_tenant_id = fields.Char("Tallyflow Tenant", readonly=True)
    tallyflow_meter = fields.Char("Tallyflow Meter", readonly=True)
    tallyflow_period = fields.Char("Tallyflow Period", readonly=True)
    tallyflow_level = fields.Char("Tallyflow Level", readonly=True)
    tallyflow_usage = fields.Numeric("Tallyflow Usage", readonly=True)
    tallyflow_limit = fields.Numeric("Tallyflow Limit", readonly=True)

    @classmethod
    def __setup__(cls) -> None:
        super().__setup__()  # type: ignore[misc]
        t = cls.__table__()
        cls._sql_constraints += [
            ("tallyflow_alert_id_unique", Unique(t, t.tallyflow_alert_id), "tallyflow.msg_opportunity_alert_id_unique"),
        ]
        cls.__rpc__.update({"tallyflow_ingest": RPC(readonly=False, result=dict)})

    @classmethod
    def copy(cls, opportunities: list[Any], default: dict[str, Any] | None = None) -> list[Any]:
        default = dict(default or {})
        default.setdefault("tallyflow_alert_id", None)
        return list(super().copy(opportunities, default=default))  # type: ignore[misc]

    @classmethod
    def tallyflow_ingest(cls, alerts: Any) -> dict[str, str]:
        """Create one lead per ThresholdAlert dict; {alert_id: created|existing|rejected: ...}."""
        pool = Pool()
        Company = pool.get("company.company")
        batch = common.check_batch(alerts)
        company = common.company_id()

        outcomes, todo = common.new_items(cls, batch, "alert_id", "tallyflow_alert_id")
        parties = common.find_parties(str(i.get("crm_account_id")) for i in todo.values())
        companies = common.find_companies(todo.values())

        # A lead's company must be the context's (its field's domain): one create per company.
        vlists: dict[int, list[dict[str, Any]]] = {}
        created = []
        for alert_id, item in todo.items():
            try:
                company_ = common.item_company(item, company, companies)
                vlists.setdefault(company_, []).append(cls._tallyflow_values(item, Company(company_), parties))
                created.append(alert_id)
            except Rejected as exc:
                outcomes[alert_id] = common.rejected(str(exc))
        for company_, vlist in vlists.items():
            with Transaction().set_context(company=company_):
                common.create_unique(cls, vlist)
        outcomes.update(dict.fromkeys(created, common.CREATED))
        return outcomes

    @classmethod
    def _tallyflow_values(cls, item: dict[str, Any], company: Any, parties: dict[str, Any]) -> dict[str, Any]:
        account = common.text(item, "crm_account_id")
        party = parties.get(account or "")
        if party is None:
            raise Rejected(f"unknown CRM account {account}: create the party with that code")
        level, meter, period = (common.text(item, k) for k in ("level", "meter", "period"))
        usage, limit = common.decimal(item, "usage"), common.decimal(item, "limit")
        crossed_at = common.timestamp(item, "crossed_at")
        assert crossed_at is not None
        correlation_id, tenant_id = common.text(item, "correlation_id"), common.text(item, "tenant_id")
        comment = "\n".join(f"{key}: {item[key]}" for key in sorted(item) if item[key] is not None)
        return {
            "party": party.id,
            "company": company.id,
            "currency": company.currency.id,
            "start_date": crossed_at.date(),
            "reference": item["alert_id"],
            "description": f"Usage alert {level}: {meter} {usage} of {limit} in {period} ({tenant_id})",
            "comment": comment,
            "tallyflow_alert_id": item["alert_id"],
            "tallyflow_correlation_id": correlation_id,
            "tallyflow_tenant_id": tenant_id,
            "tallyflow_meter": meter,
            "tallyflow_period": period,
            "tallyflow_level": level,
            "tallyflow_usage": usage,
            "tallyflow_limit": limit,
        }
