"""Prepaid credits across crashes (issue 21): the rating dataflow is killed with SIGKILL
while traffic with grants flows (grants before the usage, one of them expiring halfway, one
voided three quarters through), drained, and then the credit ledger (`usage.credits`) and the
rated lines must agree: no record and no line with differing copies; per grant, granted =
drawn - returned + expired + voided + remaining with remaining >= 0 (no grant drawn twice);
each line's credits are in the ledger and the ledger has no draw no line made (no draw lost)."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest

from devkit.generator import produce
from devkit.pipeline import LocalPipeline
from runtime.kafka import read_topic
from schemas.catalog import load_catalog
from schemas.outputs import CreditRecord, RatedUsageLine
from tests.dataflows.test_crash_replays import ENV, _caught_up
from tests.support.events import MONTH_END, hostile

pytestmark = pytest.mark.integration

EVENTS, RATE, KILLS = 24_000, 4_000, 5


def test_kill_9_rating_with_credits_draws_no_grant_twice_and_loses_no_draw() -> None:
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    print(f"crash schedule seed {seed}")
    with LocalPipeline(env=ENV, partitions=3, recovery=True) as lp:
        s = lp.settings
        spec = hostile(EVENTS, 200, seed, MONTH_END + timedelta(minutes=17), timedelta(minutes=EVENTS / RATE / 2), rate=RATE)
        spec.credits = 0.5  # 100 tenants with 3 grants each
        lp.start("rate")
        sent: list[bytes] = []
        args = (s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog))
        gen = threading.Thread(target=produce, args=args, kwargs={"record": sent}, daemon=True)
        gen.start()
        for _ in range(KILLS):
            _caught_up(lp)
            time.sleep(rng.uniform(0.2, 1.0))  # a random point to kill at, not a synchronisation
            lp.kill("rate")
            lp.start("rate")
        gen.join(120)
        assert not gen.is_alive()
        _caught_up(lp)
        lp.wait_rated(len(sent), 120)

        problems: list[str] = []
        lines: dict[str, RatedUsageLine] = {}
        for v in read_topic(s.kafka.config(), s.topics.rated):
            ln = msgspec.json.decode(v, type=RatedUsageLine)
            if ln.line_id in lines and lines[ln.line_id] != ln:
                problems.append(f"line {ln.line_id} has differing copies")
            lines.setdefault(ln.line_id, ln)
        records: dict[str, CreditRecord] = {}
        for v in read_topic(s.kafka.config(), s.topics.credits):
            r = msgspec.json.decode(v, type=CreditRecord)
            if r.record_id in records and records[r.record_id] != r:
                problems.append(f"credit record {r.record_id} has differing copies")
            records.setdefault(r.record_id, r)

        ledger: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for r in records.values():
            ledger[r.grant_id][r.kind] += r.amount
        by_lines: dict[str, Decimal] = defaultdict(Decimal)
        for ln in lines.values():
            for c in ln.credits or ():
                by_lines[c.grant_id] += c.amount
        assert len(ledger) == 300 and all(g["granted"] > 0 for g in ledger.values()), "every grant is in the ledger once"
        drawn_somewhere = 0
        for gid, k in ledger.items():
            used = k["drawn"] - k["returned"]
            remaining = k["granted"] - used - k["expired"] - k["voided"]
            if remaining < 0:
                problems.append(f"grant {gid}: used {used} + expired {k['expired']} + voided {k['voided']} > granted {k['granted']}")
            if used != by_lines.get(gid, Decimal(0)):
                problems.append(f"grant {gid}: the ledger says {used} used, the lines' credits {by_lines.get(gid)}")
            drawn_somewhere += used > 0
        assert not problems, f"seed {seed}, logs in {lp.logdir}:\n" + "\n".join(problems[:20])
        assert drawn_somewhere > 50 and any(k["expired"] for k in ledger.values()) and any(k["voided"] for k in ledger.values())
