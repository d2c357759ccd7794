"""The ERP-delivery dataflow: usage.rated -> micro-batches (by size, or by age of their first
line) -> the ERP, with backpressure: while the ERP is down the worker waits in its sink, the
backlog waits in Kafka, and alerts (another process) are not slowed at all.

Run: `tallyflow deliver erp`, or `python -m bytewax.run "dataflows.erp:get_flow()"`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow

from connectors.delivery import Batcher, CourierSink, message_values
from connectors.kafka_source import KafkaBatchSource
from dataflows.alerts import DELIVERY_PREFETCH
from runtime import kafka, process
from runtime.settings import Settings, load_settings
from schemas.outputs import RatedUsageLine
from sinks import destinations
from sinks.courier import Courier, Parking, ledger_problem
from state.ledger import Ledger

_LINE = msgspec.json.Decoder(RatedUsageLine)


def _describe(key: str, lines: Sequence[RatedUsageLine]) -> dict[str, Any]:
    return {"batch_id": key, "lines": len(lines), "line_ids": [ln.line_id for ln in lines]}


def courier(s: Settings) -> Courier[RatedUsageLine]:
    return Courier(
        destinations.erp(s),
        RatedUsageLine,
        lambda ln: ln.line_id,
        rate_per_second=s.erp.rate_per_second,
        policy=s.delivery,
        ledger=Ledger(s.stores),
        parking=Parking(kafka.producer(s.kafka.config()), s.topics.exceptions),
        batched=True,
        logged=("erp batch posted", "erp batch rejected"),
        describe=_describe,
    )


def build_flow(s: Settings, *, end_offsets: Mapping[int, int] | None = None) -> Dataflow:
    flow = Dataflow("tallyflow-erp-delivery")
    src = KafkaBatchSource(
        msgspec.structs.replace(s.kafka, start_from="earliest"),
        s.topics.rated,
        label="erp",
        end_offsets=end_offsets,
        client=DELIVERY_PREFETCH,
    )
    lines = op.flat_map("lines", op.input("rated", flow, src), lambda ms: [("erp", v) for v in message_values(ms)])
    batches = op.stateful_batch("batch", lines, lambda resume: Batcher(s.erp.batch_max_lines, s.erp.batch_max_latency_seconds, resume))
    decode = lambda keyed: [_LINE.decode(v) for v in keyed[1]]  # noqa: E731
    op.output("post", batches, CourierSink(lambda: [courier(s)], decode, "erp"))
    return flow


def get_flow() -> Dataflow:
    """Entry for `python -m bytewax.run "dataflows.erp:get_flow()"`."""
    process.refuse_worker_threads("deliver erp")
    s = load_settings()
    flow = build_flow(s)
    process.started(s, "erp", ledger=ledger_problem)
    return flow
