"""The three dataflows, one file each, wired from `connectors/`, `operators/` and `sinks/`:

* `rating`: usage.events -> validate -> dedup -> thresholds -> windows -> rating ->
  usage.alerts, usage.rated, usage.dlq;
* `alerts`: usage.alerts -> CRM and customer-success tool, each alert at once;
* `erp`: usage.rated -> ERP in micro-batches, with backpressure;
* `status`: erp.status -> the CRM account's billing status, each invoice state once.
"""

# `tallyflow rate|deliver alerts|deliver erp` -> the bytewax.run entry point of its flow.
FLOWS = {
    "rate": "dataflows.rating:get_flow()",
    "alerts": "dataflows.alerts:get_flow()",
    "erp": "dataflows.erp:get_flow()",
    "status": "dataflows.status:get_flow()",
}
