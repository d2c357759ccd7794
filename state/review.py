"""The review desk's state (SPEC §10.1): what waits on `usage.review`, what was decided on
`usage.audit`, and deciding — shared by `tallyflow review` and the API's review routes.

Every id is checked before any is decided; a Redis lock per id keeps two people from deciding
one item at once (a lock whose decider died before producing its audit record is taken over
after LOCK_STALE_S)."""

from __future__ import annotations

import time

import msgspec
import redis

from operators.ids import stable_id
from operators.periods import iso
from runtime import kafka
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.outputs import ENCODER, HeldItem, ReviewDecision

LOCK_STALE_S = 60  # a lock without its audit record after this: its decider died before producing it
ACTIONS = {"approve": "approved", "reject": "rejected"}


class Desk(msgspec.Struct):
    held: dict[str, HeldItem]  # by review id, its first copy (a replay may hold it again)
    decided: dict[str, ReviewDecision]  # by review id, the first decision

    def pending(self, tenant: str | None = None) -> list[HeldItem]:
        return sorted(
            (h for i, h in self.held.items() if i not in self.decided and (tenant is None or h.tenant_id == tenant)),
            key=lambda h: (h.tenant_id, h.held_at, h.review_id),
        )


def decisions(s: Settings) -> dict[str, ReviewDecision]:
    """Every decision on `usage.audit`, by review id: the first (a later one was refused)."""
    decided: dict[str, ReviewDecision] = {}
    for v in read_topic(s.kafka.config(), s.topics.audit):
        d = msgspec.json.decode(v, type=ReviewDecision)
        decided.setdefault(d.review_id, d)
    return decided


def load(s: Settings) -> Desk:
    held: dict[str, HeldItem] = {}
    for v in read_topic(s.kafka.config(), s.topics.review):
        h = msgspec.json.decode(v, type=HeldItem)
        held.setdefault(h.review_id, h)
    return Desk(held, decisions(s))


class Refused(Exception):
    """A decision that cannot be made: nothing was decided. `code` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def decide(s: Settings, desk: Desk, action: str, ids: list[str], tenant: str | None, by: str, why: str) -> list[ReviewDecision]:
    """The decisions on `ids` (or every item of `tenant` that waits), produced to the audit
    topic once the broker confirmed them; every id checked before any is decided."""
    if not by.strip() or not why.strip():
        raise Refused("--by and --why are required: the audit record keeps who decided and why")
    if not ids and tenant is None:
        raise Refused("name the review ids to decide (tallyflow review list shows them) or --tenant T for all of a tenant's")
    items = desk.pending(tenant) if not ids else []
    for i in ids:
        if i in desk.decided:
            d = desk.decided[i]
            raise Refused(f"'{i}' was already {ACTIONS[d.decision]} by {d.by} at {d.at} ({d.why}); nothing was decided", 1)
        h = desk.held.get(i)
        if h is None:
            raise Refused(f"no held item '{i}' on {s.topics.review}; tallyflow review list shows the ids that wait")
        if tenant is not None and h.tenant_id != tenant:
            raise Refused(f"'{i}' is tenant '{h.tenant_id}''s, not '{tenant}'s; nothing was decided")
        items.append(h)
    if not items:
        raise Refused(f"nothing of tenant '{tenant}' waits for review", 1)
    now = iso(int(time.time() * 1000))
    decisions = [
        ReviewDecision(
            audit_id=stable_id("audit", h.review_id),
            review_id=h.review_id,
            decision=action,  # type: ignore[arg-type]
            by=by,
            why=why,
            at=now,
            kind=h.kind,
            tenant_id=h.tenant_id,
            period=h.period,
            amount=h.amount,
            currency=h.currency,
            reason=h.reason,
            item=h.item,
        )
        for h in items
    ]
    r = redis.Redis.from_url(s.stores.redis_url, socket_timeout=5, socket_connect_timeout=5)
    taken: list[str] = []
    try:
        for d in decisions:
            k = f"{s.stores.key('review')}:{d.review_id}"
            if not r.set(k, f"{time.time():.0f} {by}", nx=True):
                got = r.get(k) or b"0"
                held_since = float((got.decode() if isinstance(got, bytes) else str(got)).split(" ", 1)[0])
                if time.time() - held_since < LOCK_STALE_S:
                    raise Refused(f"'{d.review_id}' is being decided by someone else right now; run tallyflow review list again", 1)
                r.set(k, f"{time.time():.0f} {by}")  # its decider died before its audit record: ours stands
            taken.append(k)
        kafka.produce_confirmed(
            s.kafka.config(), [(s.topics.audit, ENCODER.encode(d), d.tenant_id.encode()) for d in decisions], "decision(s)"
        )
    except BaseException:
        if taken:
            r.delete(*taken)  # nothing decided: the ids may be decided again
        raise
    finally:
        r.close()
    return decisions
