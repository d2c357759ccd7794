"""The read model the rating dataflow keeps in Redis, against `tallyflow reconcile`'s recount
of the input topic: after a drained run, equal for every tenant, meter and period."""

from __future__ import annotations

from decimal import Decimal

from connectors.kafka_source import Backlog
from connectors.rating import UsagePublisher
from devkit.generator import produce
from operators.stats import Stats
from ops.reconcile import recount
from runtime.settings import Settings
from schemas.catalog import load_catalog
from tests.support.events import hostile
from tests.support.flows import rated_lines, run_bounded
from tests.support.usage import read_model


def test_read_model_equals_reconcile_for_every_key_after_a_drained_run(settings: Settings) -> None:
    """Traffic around a month end with duplicates, late and malformed events: October's
    period goes final during the run (its last write comes from the engine forgetting it)."""
    gen = produce(settings.kafka.brokers, settings.topics.input, hostile(20_000, 100, seed=7), load_catalog(settings.process.catalog))
    stats = run_bounded(settings, gen.end_offsets)
    source, recounted = recount(settings)
    assert recounted.accepted == stats.accepted > 0

    docs = read_model(settings)
    quantity = {(d.tenant_id, m.meter, d.period): m.quantity for d in docs.values() for m in d.meters.values()}
    amount = {(d.tenant_id, m.meter, d.period): m.amount for d in docs.values() for m in d.meters.values()}
    # Every key of reconcile is in the read model and nothing else is, with equal figures.
    assert quantity == source.quantity
    assert amount == source.amount
    assert {p for _, p in docs} == {"2026-10", "2026-11"} and sum(amount.values()) > 0
    for d in docs.values():
        for m in d.meters.values():
            assert m.amount_rated == m.amount  # drained: every window closed and rated
            assert m.quantity == sum((v.quantity for v in m.versions), Decimal(0))
            assert m.events == sum(v.events for v in m.versions)
        assert d.events == sum(m.events for m in d.meters.values())
    # Events per key are the rated lines' event counts.
    lines = rated_lines(settings)
    assert sum(d.events for d in docs.values()) == sum(ln.event_count for ln in lines)


def test_the_read_model_yields_to_waiting_input_within_its_budget() -> None:
    """The read model takes at most 10 % of the time, and 3 % while consumes keep filling
    whole batches (input waiting)."""
    backlog = Backlog()
    for _ in range(Backlog.STREAK - 1):
        backlog.saw(1000, 1000)
    backlog.saw(999, 1000)  # one short batch: no backlog, the streak starts again
    for _ in range(Backlog.STREAK - 1):
        backlog.saw(1000, 1000)
    assert not backlog.behind()
    backlog.saw(1000, 1000)
    assert backlog.behind()

    busy = UsagePublisher(None, 0.2, Stats(), backlog=backlog)  # type: ignore[arg-type]
    assert busy.busy.allows()
    busy.busy.spend(0.05)  # a write that took 50 ms: at 3 % the next waits ~1.7 s
    assert not busy.busy.allows()
