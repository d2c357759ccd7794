"""The delivery ledger in Redis: which alert_id / line_id each destination acknowledged.

Redelivery after a restart or a replay asks it first, so every destination sees each id
once even when it has no idempotency support of its own. Keys expire after the replay
horizon (`ledger_ttl_days`). One round trip per batch in each direction (an alert, sent
alone, is recorded alone as soon as it is answered).

A batch request is written ahead (`intend`): its body is stored under its idempotency key
and its ids are marked pending before it is sent. If the process dies before the ack, the
next one finds the pending ids and re-sends the *same* body under the *same* key, which the
destination recognises, instead of re-forming a different batch around the same ids.
"""

from __future__ import annotations

from runtime.redis import client
from runtime.settings import StoreSettings

PENDING = "pending:"
DAY_S = 86_400


class Ledger:
    def __init__(self, store: StoreSettings) -> None:
        self.r = client(store.redis_url)
        self.ttl = int(store.ledger_ttl_days * DAY_S)
        self.prefix = store.key("ledger")

    def key(self, dest: str, i: str) -> str:
        return f"{self.prefix}:{dest}:{i}"

    def status(self, dest: str, ids: list[str]) -> list[str | None]:
        """Per id: None (never sent), "ok", "rejected", or "pending:<key>" (sent, outcome unknown)."""
        if not ids:
            return []
        return [_text(v) for v in self.r.mget([self.key(dest, i) for i in ids])]

    def unacked(self, dest: str, ids: list[str]) -> list[str]:
        """The ids `dest` has not acknowledged (nor had parked), in order."""
        return [i for i, st in zip(ids, self.status(dest, ids), strict=True) if st is None or st.startswith(PENDING)]

    def intend(self, dest: str, key: str, ids: list[str], body: bytes) -> None:
        p = self.r.pipeline(transaction=True)
        p.set(self.key(dest, f"intent:{key}"), body, ex=self.ttl)
        for i in ids:
            p.set(self.key(dest, i), PENDING + key, ex=self.ttl)
        p.execute()

    def intent(self, dest: str, key: str) -> bytes | None:
        v = self.r.get(self.key(dest, f"intent:{key}"))
        return v.encode() if isinstance(v, str) else v

    def forget(self, dest: str, ids: list[str]) -> None:
        """Make ids deliverable again (an exception re-driven after its cause was fixed)."""
        if ids:
            self.r.delete(*[self.key(dest, i) for i in ids])

    def ack(self, dest: str, ids: list[str], outcome: str = "ok") -> None:
        """Record the outcome (ok, or rejected: parked in the exceptions topic) for each id."""
        if not ids:
            return
        p = self.r.pipeline(transaction=False)
        for i in ids:
            p.set(self.key(dest, i), outcome, ex=self.ttl)
        p.execute()


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v
