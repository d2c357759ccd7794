"""`tallyflow replay` after a pricing fix: corrections only, and a second run sends nothing."""

from __future__ import annotations

import copy
from pathlib import Path

from ops.replay import replay
from runtime.settings import Settings
from tests.support.events import CATALOG, ev
from tests.support.flows import MIN, D, produce_events, rated_lines, run_bounded, write_catalog


def test_replay_after_a_pricing_fix_sends_only_corrections(settings: Settings, tmp_path: Path) -> None:
    cat_path = tmp_path / "catalog.yaml"
    write_catalog(cat_path, CATALOG)
    s = settings.replace(catalog=str(cat_path))
    events = [ev(at=i * MIN, id=f"c{i}") for i in range(30)] + [ev(at=3 * MIN, id="c3")]  # one duplicate
    events += [ev("late-co", at=i * MIN, id=f"l{i}") for i in range(12)]
    ends = produce_events(s, events)
    stats = run_bounded(s, ends)
    assert (stats.accepted, stats.duplicates) == (42, 1)
    before = rated_lines(s)
    assert sum(ln.amount for ln in before) == (30 - 10) * D("0.10") + (12 - 10) * D("0.10")

    # The unit price of calls was wrong: 0.10 should have been 0.12.
    fixed = copy.deepcopy(CATALOG)
    fixed["plans"][0]["meters"]["calls"]["price"]["unit_price"] = "0.12"
    write_catalog(cat_path, fixed)
    changes, _ = replay(s, {"2026-03"}, {"acme"}, dry_run=True)
    assert {(k[0], k[1], c.quantity, c.amount, c.events) for k, c in changes.items()} == {("acme", "calls", 0, D("0.40"), 0)}
    assert len(rated_lines(s)) == len(before)  # a dry run writes nothing

    changes, rstats = replay(s, {"2026-03"}, {"acme"}, dry_run=False)
    assert (rstats.accepted, rstats.duplicates) == (30, 1)  # the duplicate is still one
    assert {k[0]: c.amount for k, c in changes.items()} == {"acme": D("0.40")}
    after = rated_lines(s)
    corrections = after[len(before) :]
    assert corrections and all(ln.revision >= 1 and ln.tenant_id == "acme" for ln in corrections)
    assert len({ln.line_id for ln in after}) == len(after)
    acme = [ln for ln in after if ln.tenant_id == "acme"]
    assert (sum(ln.quantity for ln in acme), sum(ln.amount for ln in acme)) == (30, (30 - 10) * D("0.12"))
    assert sum(ln.event_count for ln in acme) == 30
    # Replaying again changes nothing.
    changes, _ = replay(s, {"2026-03"}, {"acme"}, dry_run=False)
    assert changes == {} and len(rated_lines(s)) == len(after)
