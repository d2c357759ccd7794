"""Which adapter stands behind each destination, by setting (`TALLYFLOW_ERP_KIND`,
`TALLYFLOW_CRM_KIND`: `http` or `tryton`). The couriers and dataflows only see the protocol."""

from __future__ import annotations

from runtime.settings import Settings
from schemas.outputs import RatedUsageLine, ThresholdAlert
from sinks.base import Destination
from sinks.crm import CrmHttp
from sinks.erp import ErpHttp
from sinks.success import SuccessWebhook
from sinks.tryton import EntityCompanies, TrytonCrm, TrytonErp


def erp(s: Settings) -> Destination[RatedUsageLine]:
    if s.erp.kind == "tryton":
        return TrytonErp(s.tryton, companies=EntityCompanies(s.process.catalog))
    return ErpHttp(s.erp, s.delivery.sink_timeout_seconds)


def crm(s: Settings) -> Destination[ThresholdAlert]:
    if s.crm.kind == "tryton":
        return TrytonCrm(s.tryton, companies=EntityCompanies(s.process.catalog))
    return CrmHttp(s.crm, s.delivery.sink_timeout_seconds)


def success(s: Settings) -> Destination[ThresholdAlert]:
    return SuccessWebhook(s.success, s.delivery.sink_timeout_seconds)
