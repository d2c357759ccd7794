"""Draining the dead-letter topic: what is in it, and sending events back once their cause
is fixed (a tenant or meter added to the catalog, a producer bug fixed upstream).

A dead letter keeps the exact bytes of its event, the reason and its input position. A
re-driven event goes back to the input topic and is judged afresh; an event that is
re-driven twice is dropped the second time as a duplicate (in memory, and by the Redis
dedup store for `TALLYFLOW_DEDUP_STORE_DAYS`), so running `--redrive` again is harmless.
`too_late` events stay too late: they need a finance decision, not a re-drive.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from typing import get_args

import msgspec

from ops import arguments
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import Settings, load_settings
from schemas.errors import TallyflowError
from schemas.outputs import DeadLetter, DeadLetterReason


def load(s: Settings) -> list[DeadLetter]:
    """Every dead event once: by event id where it has one (a re-driven event that failed
    again is dead twice, at two positions), else by input position (a crash replay may
    have written it twice)."""
    seen: dict[object, DeadLetter] = {}
    for v in read_topic(s.kafka.config(), s.topics.dlq):
        d = msgspec.json.decode(v, type=DeadLetter)
        key = (d.tenant_id, d.event_id) if d.event_id else (d.topic, d.partition, d.offset, d.index)
        seen[key] = d  # the latest judgement counts
    return list(seen.values())


def select(dead: Iterable[DeadLetter], reasons: list[str], tenants: list[str]) -> list[DeadLetter]:
    return [d for d in dead if (not reasons or d.reason in reasons) and (not tenants or d.tenant_id in tenants)]


def summary(dead: list[DeadLetter]) -> dict[str, object]:
    return {
        "dead_letters": len(dead),
        "by_reason": dict(Counter(d.reason for d in dead).most_common()),
        "top_tenants": dict(Counter(d.tenant_id or "(unknown)" for d in dead).most_common(10)),
        "examples": {r: next(d.message for d in dead if d.reason == r) for r in sorted({d.reason for d in dead})},
    }


def redrive(s: Settings, dead: list[DeadLetter]) -> int:
    """Produce the events back to the input topic, keyed by tenant as producers key them."""
    records = ((s.topics.input, d.payload, d.tenant_id.encode() if d.tenant_id else None) for d in dead)
    return kafka.produce_confirmed(s.kafka.config(), records, "re-driven event(s)")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reason", action="append", default=[], help="only this reason (repeatable)")
    ap.add_argument("--tenant", action="append", default=[], help="only this tenant (repeatable)")
    ap.add_argument("--redrive", action="store_true", help="produce the selected events back to the input topic")


def check(a: argparse.Namespace) -> None:
    """Before the brokers are asked: reasons that exist, and no re-drive of what cannot be."""
    arguments.one_of(a.reason, get_args(DeadLetterReason), "--reason")
    if a.redrive and "too_late" in a.reason:
        raise TallyflowError("--redrive --reason too_late: they would be too late again; settle them with finance (README: replay)")


def unknown_tenants(s: Settings, dead: list[DeadLetter], tenants: list[str]) -> None:
    """A --tenant must be in the catalog or among the dead letters (a tenant not onboarded
    yet is in them, and nowhere else)."""
    seen = {d.tenant_id for d in dead if d.tenant_id}
    missing = [t for t in tenants if t not in seen]
    if not missing:
        return
    cat = arguments.catalog(s)  # only now: draining dead letters must not need a loadable catalog
    for t in missing:
        if t not in cat.tenants:
            known = [*cat.tenants, *seen]
            raise arguments.ArgumentError(f"--tenant '{t}': no such tenant in the catalog nor in {s.topics.dlq}{arguments.hint(t, known)}")


def run(a: argparse.Namespace) -> int:
    check(a)  # (the CLI ran it before asking the brokers; cheap, and run() may be called alone)
    s = load_settings()
    dead = load(s)
    unknown_tenants(s, dead, a.tenant)
    chosen = select(dead, a.reason, a.tenant)
    out = summary(chosen)
    if a.redrive:
        # A dead letter cut to fit the topic holds only a prefix of its event: not re-drivable.
        whole = [d for d in chosen if d.reason != "too_late" and len(d.payload) >= d.payload_bytes]
        out["redriven"] = redrive(s, whole)
        out["not_redriven_cut_to_fit"] = sum(1 for d in chosen if len(d.payload) < d.payload_bytes)
    print(json.dumps(out, indent=2))
    return 0
