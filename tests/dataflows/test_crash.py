"""Crash safety: every dataflow process is killed with SIGKILL at random points under load,
restarted from its recovery store, and every invariant of SPEC §3 is checked at the end
against the independent model and what the sandbox received."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import orjson
import pytest
import yaml
from confluent_kafka import Producer

from devkit.generator import produce
from devkit.pipeline import LocalPipeline, wait_until
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.catalog import load_catalog
from schemas.outputs import DeadLetter
from tests.support.events import MONTH_END, hostile
from tests.support.reference import expected
from tests.support.usage import counts, read_model

pytestmark = pytest.mark.integration  # starts the whole pipeline as processes

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 600
ENV = {
    "TALLYFLOW_SHARDS": "8",
    "TALLYFLOW_GRACE_SECONDS": str(GRACE_S),
    "TALLYFLOW_IDLE_TIMEOUT_SECONDS": "2",
    "TALLYFLOW_SNAPSHOT_INTERVAL_SECONDS": "1",
    "TALLYFLOW_ERP_BATCH_MAX_LATENCY_SECONDS": "0.3",
    "TALLYFLOW_ERP_RATE_PER_SECOND": "50",
    "TALLYFLOW_RETRY_BASE_SECONDS": "0.05",
    "TALLYFLOW_RETRY_CAP_SECONDS": "0.5",
    "TALLYFLOW_BREAKER_RESET_SECONDS": "0.5",
}


def test_kill_9_every_dataflow_repeatedly_loses_and_doubles_nothing() -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    print(f"crash schedule seed {seed}")
    sent: list[bytes] = []
    with LocalPipeline(env=ENV, partitions=3, recovery=True) as lp:
        s = lp.settings
        spec = hostile(40_000, 120, seed, MONTH_END + timedelta(minutes=5), timedelta(minutes=30), rate=4_000)
        for name in ("rate", "alerts", "erp"):
            lp.start(name)
        args = (s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog))
        gen = threading.Thread(target=produce, args=args, kwargs={"record": sent}, daemon=True)
        gen.start()
        # The read model never goes back: a restarted rating replays from its snapshot, and
        # its older states must not overwrite what the API already showed.
        went_back: list[tuple[tuple[str, str], int, int]] = []
        watching = threading.Event()
        watcher = threading.Thread(target=_watch_read_model, args=(s, went_back, watching), daemon=True)
        watcher.start()

        # Two rounds of SIGKILL for each dataflow while traffic flows, at random moments.
        kills: list[str] = []
        for name in ["rate", "alerts", "erp"] * 2:
            lp.check_alive()  # a flow that died on its own fails the test here
            time.sleep(rng.uniform(0.3, 2.0))  # a random point in the run to kill at, not a synchronisation
            lp.kill(name)
            kills.append(name)
            lp.start(name)
        gen.join(120)
        assert not gen.is_alive() and len(sent) == spec.total

        # Copies of earlier events, produced after yet another restart of the rating
        # dataflow: they must still be recognised as duplicates.
        lp.kill("rate")
        lp.start("rate")
        kills.append("rate")
        copies = [v for v in rng.sample(sent, 2_000) if _subject(v)][:300]
        p = Producer({"bootstrap.servers": s.kafka.brokers})
        for v in copies:
            p.produce(s.topics.input, v, _subject(v).encode())
        p.flush()
        sent += copies

        ref = expected(sent, yaml.safe_load((ROOT / "examples" / "catalog.yaml").read_text()), GRACE_S)
        assert ref.duplicates >= len(copies) and ref.dead["too_late"] > 0

        def erp_totals() -> tuple[dict[tuple[str, str, str], Decimal], dict[tuple[str, str, str], Decimal]]:
            qty: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
            amt: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
            for it in lp.sandbox.items("erp").values():
                k = (it["tenant_id"], it["meter"], it["period"])
                qty[k] += Decimal(it["quantity"])
                amt[k] += Decimal(it["amount"])
            return {k: v for k, v in qty.items() if v}, {k: v for k, v in amt.items() if v}

        want_qty = {k: v for k, v in ref.quantity.items() if v}
        want_amt = {k: v for k, v in ref.amount.items() if v}
        try:
            wait_until(lambda: erp_totals() == (want_qty, want_amt), 120, "the ERP sandbox to hold exactly the expected totals")
        except TimeoutError:
            got_qty, got_amt = erp_totals()
            diff = {k: (got_qty.get(k), got_amt.get(k), v, want_amt.get(k)) for k, v in want_qty.items() if got_qty.get(k) != v}
            diff.update({k: (v, got_amt.get(k), None, None) for k, v in got_qty.items() if k not in want_qty})
            raise AssertionError(f"ERP (qty, amount) got vs want: {sorted(diff.items())[:20]}; logs in {lp.logdir}") from None

        # The read model agrees with the model on every key, and never went back meanwhile.
        def usage() -> tuple[dict[tuple[str, str, str], Decimal], dict[tuple[str, str, str], Decimal]]:
            docs = read_model(s).values()
            qty = {(d.tenant_id, m.meter, d.period): m.quantity for d in docs for m in d.meters.values() if m.quantity}
            amt = {(d.tenant_id, m.meter, d.period): m.amount for d in docs for m in d.meters.values() if m.amount}
            return qty, amt

        wait_until(lambda: usage() == (want_qty, want_amt), 30, "the read model to hold exactly the expected totals")
        watching.set()
        watcher.join(10)
        assert went_back == []

        # Effectively once: no line or alert arrived twice, whatever was replayed.
        state = lp.sandbox.state()
        assert [state[k]["duplicates"] for k in ("erp", "crm", "success")] == [0, 0, 0]
        erp = lp.sandbox.items("erp")
        crm = lp.sandbox.items("crm")
        assert len(erp) == state["erp"]["accepted"] and len(crm) == state["crm"]["accepted"] > 0
        # Alerts: one per tenant, meter, period and level, never re-fired after a restart.
        keys = Counter((a["tenant_id"], a["meter"], a["period"], a["plan_id"], a["level"]) for a in crm.values())
        assert max(keys.values()) == 1
        # Conservation and exactness: accepted events are exactly the model's, each rated
        # once; dead letters (deduplicated by position: a replay writes them again) match
        # by reason; so duplicates = in - accepted - dead match too.
        assert sum(int(it["event_count"]) for it in erp.values()) == ref.accepted
        dead = {(d.partition, d.offset, d.index): d.reason for d in map(_dead, read_topic(s.kafka.brokers, s.topics.dlq))}
        assert Counter(dead.values()) == Counter(ref.dead)
        assert len(sent) == ref.accepted + ref.duplicates + len(dead)
        assert sorted(kills) == ["alerts", "alerts", "erp", "erp", "rate", "rate", "rate"]


def _watch_read_model(s: Settings, went_back: list[tuple[tuple[str, str], int, int]], stop: threading.Event) -> None:
    """Every document's event count, as often as Redis answers, until told to stop."""
    seen: dict[tuple[str, str], int] = {}
    while not stop.wait(0.05):  # a polling period, not a synchronisation
        for k, n in counts(s).items():
            if n < seen.get(k, 0):
                went_back.append((k, seen[k], n))
            seen[k] = max(n, seen.get(k, 0))


def _subject(v: bytes) -> str:
    """The tenant of a well-formed single event, else ''."""
    try:
        d = orjson.loads(v)
    except orjson.JSONDecodeError:
        return ""
    return str(d.get("subject") or "") if isinstance(d, dict) else ""


def _dead(v: bytes) -> DeadLetter:
    return msgspec.json.decode(v, type=DeadLetter)
