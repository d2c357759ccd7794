"""The demo's own judgement: its input rate follows what rating keeps up with, and its
verdict fails when alerts are late (the pipeline's latency is what the demo shows)."""

from __future__ import annotations

import math
import time

from devkit.demo import ALERT_P99_BUDGET_MS, Pacer, idle_share, verdict


def run(pacer: Pacer, capacity: float, ticks: int) -> list[tuple[float, float]]:
    """A machine where rating takes in at most `capacity` events/s: per tick, the backlog
    grows by what the pacer produced beyond that. Returns (rate, seconds waiting) per tick."""
    backlog = 0.0
    out = []
    for _ in range(ticks):
        rate = pacer.rate
        backlog = max(0.0, backlog + (rate - capacity) * pacer.TICK_S)
        pacer.update(int(backlog))
        out.append((rate, backlog / rate))
    return out


def test_the_pacer_keeps_the_asked_rate_while_rating_keeps_up():
    p = Pacer(12_500)
    trace = run(p, capacity=40_000, ticks=200)
    assert all(rate == 12_500 for rate, _ in trace) and p.lowest == 12_500


def test_the_pacer_slows_to_what_rating_sustains_and_the_backlog_stays_small():
    p = Pacer(12_500)
    trace = run(p, capacity=8_000, ticks=600)  # two minutes on a machine that rates 8,000/s
    settled = trace[100:]
    average = sum(rate for rate, _ in settled) / len(settled)
    assert 6_500 < average <= 8_100, f"settled at {average:,.0f} events/s for a capacity of 8,000"
    worst = max(waiting for _, waiting in settled)
    assert worst < 0.6, f"input waited up to {worst:.2f}s once settled"
    assert p.lowest >= p.floor


def test_the_pacer_recovers_when_the_machine_frees_up_and_never_goes_below_its_floor():
    p = Pacer(12_500)
    run(p, capacity=1_000, ticks=100)  # a machine busy with something else: down to the floor, no further
    assert p.rate == p.floor == 12_500 / 2
    run(p, capacity=40_000, ticks=100)
    assert p.rate == 12_500


def test_a_saturated_machine_slows_the_pacer_before_a_backlog_shows_and_headroom_lets_it_rise():
    """No CPU idle on the machine (something else took a core): every process queues for
    one, so the rate goes down before rating's backlog shows it; it rises only with room."""
    p = Pacer(12_500)
    for _ in range(12):
        p.update(backlog=0, idle=0.01)
    assert p.rate < 12_500 * 0.6
    low = p.rate
    for _ in range(12):
        p.update(backlog=0, idle=0.10)  # neither saturated nor roomy: hold
    assert p.rate == low
    for _ in range(100):
        p.update(backlog=0, idle=0.40)
    assert p.rate == 12_500
    q = Pacer(12_500)
    for _ in range(100):
        q.update(backlog=0, idle=None)  # not known (not Linux): the backlog alone decides
    assert q.rate == 12_500


def test_records_that_waited_for_rating_slow_the_pacer_though_no_backlog_shows():
    """Rating takes in all it is fed, but each batch's first records waited: that wait is the
    alerts' latency, so it cuts the rate; the rate rises again only once records are prompt."""
    p = Pacer(12_500)
    for _ in range(12):
        p.update(backlog=0, idle=0.40, delay=0.30)
    assert p.rate < 12_500 * 0.6
    low = p.rate
    for _ in range(12):
        p.update(backlog=0, idle=0.40, delay=0.10)  # neither delayed nor prompt: hold
    assert p.rate == low
    for _ in range(100):
        p.update(backlog=0, idle=0.40, delay=0.02)
    assert p.rate == 12_500


def test_the_idle_sampler_reads_the_machines_cpu():
    sample = idle_share()
    assert sample() is None or isinstance(sample(), float)
    time.sleep(0.05)
    share = sample()
    assert share is None or 0.0 <= share <= 1.0


def test_the_verdict_fails_when_alert_p99_exceeds_its_budget():
    assert ALERT_P99_BUDGET_MS == 500
    assert verdict(True, True, True, 0, True, 420.0) == []
    (why,) = verdict(True, True, True, 0, True, 612.0)
    assert "p99 612 ms over its 500 ms budget" in why
    assert verdict(True, True, True, 0, True, math.nan), "no alert measured is no evidence of latency"
    assert len(verdict(False, True, True, 2, False, 100.0)) == 3


def test_the_readme_shows_what_the_demo_traffic_comes_to() -> None:
    """The README's sample output (issue 23: it printed 2,038 alerts where the demo made
    2,031): its counts that do not depend on timing are what the rating operators make of
    the demo's traffic, computed here without a broker."""
    import re
    from pathlib import Path

    from devkit.demo import deterministic

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("summary: rating (what the rating dataflow made of the input)", 1)[1].split("```", 1)[0]

    def row(label: str) -> str:
        m = re.search(rf"^  {re.escape(label)}\s+(.*)$", block, re.M)
        assert m, label
        return m.group(1)

    want = deterministic()
    assert int(row("accepted").replace(",", "")) == want["accepted"]
    assert int(row("duplicates dropped").split()[0].replace(",", "")) == want["duplicates"]
    dead = dict(re.findall(r"(\w+) (\d+)", row("dead letters (usage.dlq)").split("  ", 1)[1]))
    assert {k: int(v) for k, v in dead.items()} == want["dead"]
    alerts = row("threshold alerts (usage.alerts)")
    assert int(alerts.split()[0].replace(",", "")) == sum(want["alerts"].values())
    levels = dict(re.findall(r"([\w%:.\-]+) (\d+)(?:,|$)", alerts.split("by level: ", 1)[1]))
    assert {k: int(v) for k, v in levels.items()} == want["alerts"]
