"""The alert-delivery dataflow: usage.alerts -> CRM and customer-success tool, each alert as
soon as it is read, to both destinations at once, each with up to `alert_max_in_flight`
requests in flight (a tenant's alerts in order). A separate process from ERP delivery, so
a slow or dead ERP never slows an alert.

Run: `tallyflow deliver alerts`, or `python -m bytewax.run "dataflows.alerts:get_flow()"`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow

from connectors.delivery import CourierSink, message_values
from connectors.kafka_source import KafkaBatchSource
from runtime import kafka, process
from runtime.metrics import DELIVERY_LATENCY
from runtime.settings import Settings, load_settings
from schemas.outputs import ThresholdAlert
from sinks import destinations
from sinks.base import Destination
from sinks.courier import Courier, Parking, ledger_problem
from state.ledger import Ledger

# A delivery consumer keeps little ahead of its sink: while a destination is down the
# backlog must wait in Kafka, not in this process.
DELIVERY_PREFETCH = {"queued.max.messages.kbytes": 4096, "queued.min.messages": 2000}
_ALERT = msgspec.json.Decoder(ThresholdAlert)


def _describe(key: str, alerts: Sequence[ThresholdAlert]) -> dict[str, Any]:
    (a,) = alerts
    return {"alert_id": a.alert_id, "correlation_id": a.correlation_id, "tenant_id": a.tenant_id}


def couriers(s: Settings) -> list[Courier[ThresholdAlert]]:
    parking = Parking(kafka.producer(s.kafka.config()), s.topics.exceptions)
    out: list[Courier[ThresholdAlert]] = []
    dests: list[tuple[Destination[ThresholdAlert], float]] = [
        (destinations.crm(s), s.crm.rate_per_second),
        (destinations.success(s), s.success.rate_per_second),
    ]
    for dest, rate in dests:
        name = dest.name
        out.append(
            Courier(
                dest,
                ThresholdAlert,
                lambda a: a.alert_id,
                rate_per_second=rate,
                policy=s.delivery,
                ledger=Ledger(s.stores),
                parking=parking,
                batched=False,
                logged=("alert delivered", "alert rejected"),
                describe=_describe,
                on_accepted=lambda a, n=name: DELIVERY_LATENCY.labels(n).observe(  # type: ignore[misc]
                    max(0.0, time.time() - datetime.fromisoformat(a.detected_at).timestamp())
                ),
                select=lambda a, n=name: n in a.destinations,  # type: ignore[misc]
                order=lambda a: a.tenant_id,  # 80 % before 100 % when one event crossed both
            )
        )
    return out


def build_flow(s: Settings, *, end_offsets: Mapping[int, int] | None = None) -> Dataflow:
    flow = Dataflow("tallyflow-alert-delivery")
    src = KafkaBatchSource(
        msgspec.structs.replace(s.kafka, start_from="earliest"),
        s.topics.alerts,
        label="alerts",
        end_offsets=end_offsets,
        client=DELIVERY_PREFETCH,
    )
    decode = lambda msgs: [_ALERT.decode(v) for v in message_values(msgs)]  # noqa: E731
    op.output("deliver", op.input("alerts", flow, src), CourierSink(lambda: couriers(s), decode, "alerts"))
    return flow


def get_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.alerts:get_flow()"`."""
    process.refuse_worker_threads("deliver alerts")
    s = load_settings()
    flow = build_flow(s)
    process.started(s, "alerts", ledger=ledger_problem)
    return flow
