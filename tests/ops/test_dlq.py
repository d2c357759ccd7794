"""`tallyflow dlq`: draining dead letters once their cause is fixed."""

from __future__ import annotations

import copy
from pathlib import Path

from ops import dlq
from runtime.kafka import log_ends
from runtime.settings import Settings
from tests.support.events import CATALOG, ev
from tests.support.flows import MIN, produce_events, rated_lines, run_bounded, write_catalog


def test_dead_letters_drain_once_the_catalog_knows_the_tenant(small: Settings) -> None:
    """The runbook's DLQ drain: a tenant that was not onboarded in time is added to the
    catalog, its dead letters are re-driven and rated; a second re-drive changes nothing."""
    s = small
    ends = produce_events(s, [*(ev("newco", at=i * MIN, id=f"n{i}") for i in range(8)), b"{not json", ev(at=MIN, id="a1")])
    first = run_bounded(s, ends)
    assert (first.accepted, dict(first.dead)) == (1, {"unknown_tenant": 8, "invalid_json": 1})
    dead = dlq.load(s)
    assert dlq.summary(dead)["by_reason"] == {"unknown_tenant": 8, "invalid_json": 1}
    cat = copy.deepcopy(CATALOG)
    cat["tenants"].append(
        {"tenant_id": "newco", "plan": "basic", "crm_account_id": "CRM-9", "erp_customer_id": "ERP-9", "contract_id": "C-9"}
    )
    write_catalog(Path(s.process.catalog), cat)

    assert dlq.redrive(s, dlq.select(dead, ["unknown_tenant"], [])) == 8
    ends2 = log_ends(s.kafka.brokers, s.topics.input)
    second = run_bounded(s, ends2, start=ends)
    assert (second.records_in, second.accepted, dict(second.dead)) == (8, 8, {})
    assert sum(ln.event_count for ln in rated_lines(s) if ln.tenant_id == "newco") == 8

    dlq.redrive(s, dlq.select(dead, ["unknown_tenant"], ["newco"]))  # by mistake, again
    third = run_bounded(s, log_ends(s.kafka.brokers, s.topics.input), start=ends2)
    assert (third.accepted, third.duplicates) == (0, 8)
