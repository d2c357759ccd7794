"""The status-delivery dataflow (SPEC §10.3): erp.status -> the tenant's CRM account, each
invoice state as soon as it is read, once per state change (the delivery ledger knows its
`status_id`, so a webhook told twice or a replay after a crash is one change at the CRM).

Run: `tallyflow deliver status`, or `python -m bytewax.run "dataflows.status:get_flow()"`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow

from connectors.delivery import CourierSink, message_values
from connectors.kafka_source import KafkaBatchSource
from dataflows.alerts import DELIVERY_PREFETCH
from runtime import kafka, process
from runtime.settings import Settings, load_settings
from schemas.outputs import InvoiceStatus
from sinks.base import Destination
from sinks.courier import Courier, Parking, ledger_problem
from sinks.crm import CrmStatusHttp
from sinks.tryton import TrytonCrmStatus
from state.ledger import Ledger

_STATUS = msgspec.json.Decoder(InvoiceStatus)


def _describe(key: str, items: Sequence[InvoiceStatus]) -> dict[str, Any]:
    (st,) = items
    return {"status_id": st.status_id, "invoice_id": st.invoice_id, "state": st.state, "tenant_id": st.tenant_id}


def destination(s: Settings) -> Destination[InvoiceStatus]:
    """Where the CRM is (`TALLYFLOW_CRM_KIND`): its billing-status endpoint, or Tryton's parties."""
    if s.crm.kind == "tryton":
        return TrytonCrmStatus(s.tryton)
    return CrmStatusHttp(s.crm, s.delivery.sink_timeout_seconds)


def couriers(s: Settings) -> list[Courier[InvoiceStatus]]:
    return [
        Courier(
            destination(s),
            InvoiceStatus,
            lambda st: st.status_id,
            rate_per_second=s.crm.rate_per_second,
            policy=s.delivery,
            ledger=Ledger(s.stores),
            parking=Parking(kafka.producer(s.kafka.config()), s.topics.exceptions),
            batched=False,
            logged=("invoice status delivered", "invoice status rejected"),
            describe=_describe,
            order=lambda st: st.invoice_id,  # an invoice's states in the order the ERP reached them
        )
    ]


def _decode(msgs: list[Any]) -> list[InvoiceStatus]:
    """A batch's statuses, each change once (a webhook the ERP retried is on the topic twice;
    across batches the delivery ledger knows it)."""
    out: dict[str, InvoiceStatus] = {}
    for v in message_values(msgs):
        st = _STATUS.decode(v)
        out.setdefault(st.status_id, st)
    return list(out.values())


def build_flow(s: Settings, *, end_offsets: Mapping[int, int] | None = None) -> Dataflow:
    flow = Dataflow("tallyflow-status-delivery")
    src = KafkaBatchSource(
        msgspec.structs.replace(s.kafka, start_from="earliest"),
        s.topics.status,
        label="status",
        end_offsets=end_offsets,
        client=DELIVERY_PREFETCH,
    )
    op.output("deliver", op.input("status", flow, src), CourierSink(lambda: couriers(s), _decode, "status"))
    return flow


def get_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.status:get_flow()"`."""
    process.refuse_worker_threads("deliver status")
    s = load_settings()
    flow = build_flow(s)
    process.started(s, "status", ledger=ledger_problem)
    return flow
