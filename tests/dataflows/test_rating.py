"""The rating dataflow against the real broker, checked against an independent model."""

from __future__ import annotations

from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import msgspec
import orjson
import yaml
from bytewax._bytewax import cli_main
from confluent_kafka import Producer

from dataflows.rating import Bounds, build_flow
from devkit.generator import produce
from operators.stats import Stats
from ops.reconcile import compare, rated_and_acknowledged, recount
from runtime.kafka import read_topic
from runtime.settings import Settings, to_env
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER, DeadLetter, RatedUsageLine, ThresholdAlert
from tallyflow.cli import main as tallyflow
from tests.support.events import hostile
from tests.support.reference import expected

ROOT = Path(__file__).resolve().parents[2]


def run(s: Settings, end_offsets: dict[int, int]) -> tuple[Stats, list[ThresholdAlert], list[RatedUsageLine], list[DeadLetter]]:
    stats = Stats()
    cli_main(build_flow(s, bounds=Bounds(end_offsets), stats=stats))
    alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
    lines = [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated)]
    dead = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.brokers, s.topics.dlq)]
    return stats, alerts, lines, dead


def test_generated_traffic_is_conserved_exact_and_alerted_once(settings: Settings, monkeypatch, capsys):
    """40k events around a month end with duplicates, late, hours-late and malformed ones."""
    cat = load_catalog(settings.process.catalog)
    sent: list[bytes] = []
    gen = produce(settings.kafka.brokers, settings.topics.input, hostile(40_000, 150, seed=11), cat, record=sent)
    stats, alerts, lines, dead = run(settings, gen.end_offsets)

    # Conservation: every record is accepted, a duplicate or a dead letter; the topics agree.
    assert stats.records_in == len(sent) == 40_000
    assert stats.accepted + stats.duplicates + len(dead) == stats.records_in
    assert len(dead) == sum(stats.dead.values()) and len(lines) == stats.lines

    # The independent model agrees on every count and, per tenant/meter/period, to the cent.
    ref = expected(sent, yaml.safe_load((ROOT / "examples" / "catalog.yaml").read_text()), settings.engine.grace_seconds)
    assert (stats.accepted, stats.duplicates) == (ref.accepted, ref.duplicates)
    assert Counter(d.reason for d in dead) == Counter(ref.dead)
    assert ref.dead["too_late"] > 0 and ref.duplicates > 0 and ref.dead["invalid_json"] > 0
    qty: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    amt: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for ln in lines:
        qty[(ln.tenant_id, ln.meter, ln.period)] += ln.quantity
        amt[(ln.tenant_id, ln.meter, ln.period)] += ln.amount
    assert dict(qty) == {k: v for k, v in ref.quantity.items()}
    assert dict(amt) == {k: v for k, v in ref.amount.items()}
    assert sum(amt.values()) > 0

    # Late events within grace became corrections; ids are unique.
    assert any(ln.revision > 0 for ln in lines)
    assert len({ln.line_id for ln in lines}) == len(lines)
    assert len({a.alert_id for a in alerts}) == len(alerts)
    assert len({(a.tenant_id, a.meter, a.period, a.plan_id, a.level) for a in alerts}) == len(alerts)
    assert all(a.usage >= a.limit for a in alerts)
    assert {a.period for a in alerts} == {"2026-10", "2026-11"}

    # Reconciliation: the recount from the input topic agrees with usage.rated everywhere...
    source, recounted = recount(settings)
    rated, _ = rated_and_acknowledged(settings, with_erp=False)
    assert compare({"source": source, "rated": rated}) == []
    assert (recounted.accepted, recounted.duplicates) == (stats.accepted, stats.duplicates)
    # ...and a line that should not be there is reported, with exit code 1.
    forged = msgspec.structs.replace(lines[0], line_id="forged", quantity=lines[0].quantity + 1)
    p = Producer({"bootstrap.servers": settings.kafka.brokers})
    p.produce(settings.topics.rated, ENCODER.encode(forged))
    p.flush()
    for k, v in to_env(settings).items():
        monkeypatch.setenv(k, v)
    assert tallyflow(["reconcile", "--no-erp", "--json"]) == 1
    report = orjson.loads(capsys.readouterr().out)
    assert [(d["tenant"], d["meter"], d["period"]) for d in report["differences"]] == [(forged.tenant_id, forged.meter, forged.period)]


def test_malformed_and_batched_messages(settings: Settings):
    def e(i: int, **kw: object) -> dict[str, object]:
        return {
            "specversion": "1.0",
            "id": f"m{i}",
            "source": "svc",
            "type": "llm.tokens",
            "subject": "t-0001",
            "time": f"2026-11-02T10:00:{i:02d}Z",
            "data": {"tokens": 10},
            **kw,
        }

    messages = [
        orjson.dumps(e(1)),
        orjson.dumps([e(2), e(3, subject="ghost"), e(4)]),  # a batch with one bad element
        b"\xff\xfe not even utf-8",
        orjson.dumps(e(5, data={"tokens": -1})),
        orjson.dumps(e(1)),  # duplicate of the first
        b"",
        orjson.dumps(e(6)),
    ]
    p = Producer({"bootstrap.servers": settings.kafka.brokers})
    ends: dict[int, int] = {}
    for m in messages:
        p.produce(
            settings.topics.input,
            m,
            b"t-0001",
            partition=0,
            on_delivery=lambda err, msg: ends.__setitem__(msg.partition(), msg.offset() + 1),
        )
    p.flush()
    stats, _, lines, dead = run(settings, ends)
    assert (stats.records_in, stats.accepted, stats.duplicates) == (9, 4, 1)
    assert sorted(d.reason for d in dead) == ["bad_quantity", "invalid_json", "invalid_json", "unknown_tenant"]
    ghost = next(d for d in dead if d.reason == "unknown_tenant")
    assert (ghost.index, ghost.offset, ghost.event_id) == (1, 1, "m3")
    assert sum(ln.quantity for ln in lines) == 40
