"""The one-pass engine (intake decodes and routes; each shard judges, dedups, windows and
rates its events in one loop) gives exactly what the two-pass path before it gave (judge
everything into records, group by shard, then apply), on hostile generated traffic: the
same rated lines, alerts (but their detection time) and dead letters (but their receipt
time), byte for byte. The digests below were taken from the two-pass path at 935723a with
`python -m tests.operators.test_one_pass` (which prints them for the code it runs on)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

from devkit.generator import events
from operators.catalog_index import CatalogIndex
from operators.engine import ShardEngine
from operators.engine_state import EngineConfig, Out
from operators.sharding import Sharder
from operators.stats import Stats
from operators.validate import Validator
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER
from tests.support.events import Msg, hostile

LATER = ("headers", "grant_id", "legal_entity")
# From the two-pass path (Validator.parse_batch -> Sharder.group -> ShardEngine.process(records)).
TWO_PASS = {
    "lines": (11509, "75bc54d421e59ad1d3df0f8ec284aac45efb672cfafd3e927511604b1890e878"),
    "alerts": (86, "cbd8f2ea35886c81eff1e2b58415f9cc3a488a1aee90f5d8eca50834f79fceda"),
    "dead": (404, "e700a16e5a8ddca6c7a658556c228c2a7420b1260fda8085881d30f150a9b586"),
    "stats": (
        "records_in=30000 accepted=28993 duplicates=603 "
        "bad_quantity=60 invalid_json=72 schema=52 too_late=103 unknown_meter=67 unknown_tenant=50"
    ),
}


def run() -> dict[str, Any]:
    """30,000 events of 200 tenants across a month end (2 % duplicates, 2 % late, 1 %
    malformed) in batches of 500 messages over 3 partitions, 64 shards, as the dataflow
    drives the operators."""
    cat_raw = load_catalog(Path(__file__).parent / "data" / "catalog-935723a.yaml")  # pinned: the digests are of its traffic
    vals = [v for _, _, v, _ in events(hostile(30_000, 200, seed=11, span=timedelta(minutes=40)), cat_raw)]
    stats = Stats()
    judge = Validator(CatalogIndex.build(cat_raw), stats)
    cfg = EngineConfig(grace_ms=600_000, idle_timeout_s=30)
    sharder = Sharder(64)
    engines: dict[str, ShardEngine] = {}
    out = Out()

    def take(o: Out) -> None:
        out.lines.extend(o.lines)
        out.alerts.extend(o.alerts)
        out.dead.extend(o.dead)

    for b, start in enumerate(range(0, len(vals), 500)):
        part = b % 3
        msgs = [Msg(x, start + i, 0) for i, x in enumerate(vals[start : start + 500])]
        groups, dead = judge.route(msgs, "usage.events", part, "now", 1_900_000_000_000, sharder)
        out.dead.extend(dead)
        for k, items in groups.items():
            eng = engines.get(k) or engines.setdefault(k, ShardEngine(judge, cfg, stats))
            take(eng.process(items, "usage.events", part, 1000.0 + b, "now"))
    for eng in engines.values():
        take(eng.flush_all())

    def canon(xs: list[Any], drop: str, key: Any) -> tuple[int, str]:
        # Fields added since the digests were taken (absent there): `headers` (binary-mode dead
        # letters), `grant_id` (credit alerts) and `legal_entity` (SPEC §10.2), when unset.
        docs = [{k: v for k, v in orjson.loads(ENCODER.encode(x)).items() if k != drop and (v is not None or k not in LATER)} for x in xs]
        docs.sort(key=key)
        return len(docs), hashlib.sha256(orjson.dumps(docs, option=orjson.OPT_SORT_KEYS)).hexdigest()

    dead_counts = " ".join(f"{k}={v}" for k, v in sorted(stats.dead.items()) if v)
    return {
        "lines": canon(out.lines, "", lambda d: d["line_id"]),
        "alerts": canon(out.alerts, "detected_at", lambda d: d["alert_id"]),
        "dead": canon(out.dead, "received_at", lambda d: (d["partition"], d["offset"], -1 if d["index"] is None else d["index"])),
        "stats": f"records_in={stats.records_in} accepted={stats.accepted} duplicates={stats.duplicates} {dead_counts}",
    }


def test_the_one_pass_engine_gives_what_the_two_pass_path_gave() -> None:
    assert run() == TWO_PASS


if __name__ == "__main__":
    print(run())


def test_an_event_for_a_tenant_of_another_process_crosses_as_its_json() -> None:
    """Bytewax pickles what it sends to another process's worker; the decoded event classes
    are generated per catalog, so they travel as JSON and are decoded again there."""
    import pickle

    from tests.support.events import Harness, ev

    h = Harness()
    items = h.route(ev("acme"), ev("bolt", "llm.tokens", data={"tokens": "1.5"}))
    back = pickle.loads(pickle.dumps(items))
    assert back == items and [type(it[0]) for it in back] == [type(it[0]) for it in items]
    h.engine.process(back, "usage.events", 0, 1000.0, "now")
    assert h.stats.accepted == 2


class _Held:
    """A long-horizon store's answers, from a dict (tenant, hash) -> position: the protocol
    the engine speaks to `state/dedup_store.py`, whose Redis side has tests of its own."""

    def __init__(self, held: dict[tuple[str, int], int]) -> None:
        self.held, self.asked = held, []  # type: ignore[var-annotated]

    def duplicates(self, questions: Any) -> set[int]:
        self.asked.append(list(questions))
        return {i for i, (t, h, _, pos) in enumerate(questions) if self.held.get((t, h), pos) != pos}

    def evicted(self, gone: Any) -> None:
        pass


def test_events_memory_cannot_judge_wait_with_their_tenant_for_one_question_to_the_store() -> None:
    """A tenant new to this process: its events wait (in order) for one question after the
    pass, and a copy the store holds from another position is a duplicate; other tenants'
    events are applied in the pass meanwhile."""
    from datetime import timedelta

    from operators.dedup import event_hash
    from tests.support.events import Harness, ev

    h = Harness()
    store = _Held({("acme", event_hash("acme", "svc", "e-2")): 12345})  # e-2 was read elsewhere before
    h.engine.backstop = store
    h.feed(ev("bolt", at=timedelta(seconds=1), id="b-0"))  # bolt is known to memory from here on
    store.asked.clear()
    events = [
        ev("acme", at=timedelta(seconds=2), id="e-1"),
        ev("bolt", at=timedelta(seconds=3), id="b-1"),
        ev("acme", at=timedelta(seconds=4), id="e-2"),
        ev("acme", at=timedelta(seconds=5), id="e-3"),
    ]
    out = h.feed(*events)
    assert [[q[0] for q in qs] for qs in store.asked] == [["acme", "acme", "acme"]]  # one question, acme's events only
    assert h.stats.duplicates == 1 and h.stats.accepted == 1 + 3
    assert not out.dead
    assert h.stats.conservation_gap() == 0
