"""`tallyflow erp-status`: invoice states from Tryton to `erp.status` (SPEC §10.3), for the
status delivery to take to the CRM. Tryton tells no webhook, so this polls `account.invoice`
for what was created or written since its cursor, and tells each state an invoice reached
(draft, posted, paid, cancelled; `validated` is not told) once: the last state told per
invoice and the cursor are kept in Redis, written after the broker confirmed the statuses
(a crash in between tells them again under the same ids, which the delivery ledger knows).
An invoice of a customer no tenant has is parked on the exceptions topic with its reason;
the catalog is re-read when it changes, and `tallyflow exceptions --destination erp-status
--redrive` tells a parked state once the catalog has its customer.

    tallyflow erp-status [--interval 10] [--once]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import threading
from typing import Any

import redis

from operators.catalog_index import CatalogIndex
from operators.stats import Stats
from operators.status import status_of
from runtime import kafka
from runtime.catalog_watch import CatalogWatch
from runtime.logs import setup_logging
from runtime.settings import Settings, load_settings
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER, StatusNotice
from sinks.courier import parked
from sinks.tryton import TrytonClient

log = logging.getLogger(__name__)
TOLD = ("draft", "posted", "paid", "cancelled")
FIELDS = ["state", "party.code", "total_amount", "currency.code", "write_date", "create_date"]


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t  # Tryton keeps UTC, naive


class TrytonInvoices:
    """One poll at a time: `once` tells what changed since the last."""

    def __init__(self, s: Settings, client: TrytonClient | None = None) -> None:
        self.s = s
        self.client = client or TrytonClient(s.tryton)
        self.r = redis.Redis.from_url(s.stores.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.key = s.stores.key("status:tryton")
        # The catalog maps ERP customers to tenants; a tenant added later is found without a restart.
        self.catalog = CatalogWatch(
            s.process.catalog, CatalogIndex.build(load_catalog(s.process.catalog)), s.process.catalog_reload_seconds, Stats()
        )

    def once(self) -> dict[str, int]:
        self.catalog.poll()
        raw = self.r.hget(self.key, "cursor")
        cursor = dt.datetime.fromisoformat(raw.decode()) if isinstance(raw, bytes) else None
        domain: list[Any] = [] if cursor is None else ["OR", ["write_date", ">=", cursor], ["create_date", ">=", cursor]]
        rows = self.client.call("model.account.invoice.search_read", domain, 0, None, [["id", "ASC"]], FIELDS)
        told = {_s(k): _s(v) for k, v in self.r.hgetall(f"{self.key}:told").items()}
        records: list[tuple[str, bytes, bytes | None]] = []
        changed: dict[str, str] = {}
        newest = cursor
        counts = {"invoices": len(rows), "told": 0, "parked": 0}
        for row in rows:
            at = _utc(row.get("write_date") or row["create_date"])
            newest = at.replace(tzinfo=None) if newest is None or at.replace(tzinfo=None) > newest else newest
            invoice_id, state = f"tryton-{row['id']}", row["state"]
            if state not in TOLD or told.get(invoice_id) == state:
                continue
            notice = StatusNotice(
                invoice_id=invoice_id,
                erp_customer_id=(row.get("party.") or {}).get("code") or "",
                state=state,
                at=at,
                amount=row.get("total_amount"),
                currency=(row.get("currency.") or {}).get("code"),
            )
            st = status_of(self.catalog.index, notice)
            if isinstance(st, str):
                record = parked("erp-status", f"{invoice_id}:{state}", [notice], [invoice_id], {invoice_id: st})
                records.append((self.s.topics.exceptions, record, b"erp-status"))
                counts["parked"] += 1
            else:
                records.append((self.s.topics.status, ENCODER.encode(st), st.tenant_id.encode()))
                counts["told"] += 1
            changed[invoice_id] = state
        kafka.produce_confirmed(self.s.kafka.config(), records, "invoice status(es)")
        p = self.r.pipeline(transaction=False)
        if changed:
            p.hset(f"{self.key}:told", mapping=dict(changed))  # type: ignore[arg-type]
        if newest is not None:
            p.hset(self.key, "cursor", newest.isoformat())  # >= next time: what shares its second is read again, told once
        p.execute()
        return counts

    def close(self) -> None:
        self.client.close()
        self.r.close()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between polls of Tryton's invoices")
    ap.add_argument("--once", action="store_true", help="poll once, print what was told, and exit")


def run(a: argparse.Namespace) -> int:
    s = load_settings()
    setup_logging(s.process.log_format, s.process.log_level, "erp-status")  # a long-running poller: its logs are its health
    poller = TrytonInvoices(s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while True:
            counts = poller.once()
            if a.once:
                print(json.dumps(counts))
                return 0
            if counts["told"] or counts["parked"]:
                log.info("invoice statuses told", extra=counts)
            if stop.wait(a.interval):  # the poll period, and how a stop is heard
                return 0
    finally:
        poller.close()
