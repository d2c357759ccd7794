"""Small builders shared by tests: a controlled catalog, CloudEvent bytes, and generated traffic."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from devkit.generator import GenSpec
from operators.catalog_index import CatalogIndex
from operators.engine import ShardEngine
from operators.engine_state import EngineConfig
from operators.stats import Stats
from operators.validate import Item, Validator
from schemas.catalog import parse_catalog
from schemas.outputs import DeadLetter
from schemas.records import Accepted

MONTH_END = datetime(2026, 10, 31, 23, 40, tzinfo=UTC)
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
UPGRADE_AT = datetime(2026, 3, 20, 0, 0, tzinfo=UTC)

CATALOG: dict[str, Any] = {
    "meters": [
        {"slug": "calls", "event_type": "api.request", "aggregation": "COUNT"},
        {"slug": "tokens", "event_type": "llm.tokens", "aggregation": "SUM", "value_path": "tokens"},
        {"slug": "storage", "event_type": "storage.snapshot", "aggregation": "MAX", "value_path": "usage.gb"},
        {"slug": "users", "event_type": "user.active", "aggregation": "UNIQUE_COUNT", "unique_path": "user_id"},
        {"slug": "seats", "event_type": "seats.updated", "aggregation": "LATEST", "value_path": "seats"},
    ],
    "plans": [
        {
            "id": "basic",
            "version": 1,
            "currency": "USD",
            "meters": {
                "calls": {
                    "included": 10,
                    "product_code": "CALLS",
                    "price": {"model": "per_unit", "unit_price": "0.10"},
                    "thresholds": [
                        {"fraction": "0.8"},
                        {"fraction": "1.0"},
                        {"fraction": "1.2"},
                        {"fraction": "1.0", "sustained_periods": 2, "name": "expansion"},
                    ],
                },
                "tokens": {
                    "included": 100,
                    "product_code": "TOK",
                    "price": {
                        "model": "graduated",
                        "tiers": [{"up_to": 1000, "unit_price": "0.003"}, {"up_to": None, "unit_price": "0.001", "flat_fee": "0.5"}],
                    },
                    "thresholds": [{"absolute": 500, "name": "big"}],
                },
                "storage": {"product_code": "STO", "price": {"model": "per_unit", "unit_price": "0.25"}},
                "users": {"product_code": "MAU", "price": {"model": "package", "package_size": 5, "package_price": "2"}},
                "seats": {
                    "product_code": "SEAT",
                    "price": {"model": "volume", "tiers": [{"up_to": 10, "unit_price": "5"}, {"up_to": None, "unit_price": "4"}]},
                },
            },
        },
        {
            "id": "plus",
            "version": 2,
            "currency": "USD",
            "meters": {
                "calls": {
                    "included": 100,
                    "product_code": "CALLS",
                    "price": {"model": "per_unit", "unit_price": "0.05"},
                    "thresholds": [{"fraction": "0.8"}, {"fraction": "1.0"}],
                },
            },
        },
    ],
    "tenants": [
        {"tenant_id": "acme", "plan": "basic", "crm_account_id": "CRM-1", "erp_customer_id": "ERP-1", "contract_id": "C-1"},
        {
            "tenant_id": "bolt",
            "plan": "basic",
            "crm_account_id": "CRM-2",
            "erp_customer_id": "ERP-2",
            "contract_id": "C-2",
            "plan_changes": [{"plan": "plus", "effective_from": UPGRADE_AT.isoformat()}],
        },
        {
            "tenant_id": "late-co",
            "plan": "basic",
            "crm_account_id": "CRM-3",
            "erp_customer_id": "ERP-3",
            "contract_id": "C-3",
            "effective_from": "2026-03-01T00:00:00Z",
        },
    ],
}

_ids = itertools.count()


def ev(
    tenant: str = "acme",
    etype: str = "api.request",
    at: datetime | timedelta = timedelta(0),
    data: dict[str, Any] | None = None,
    id: str | None = None,
    source: str = "svc",
) -> bytes:
    """CloudEvent bytes; `at` is an absolute time or an offset from T0."""
    t = at if isinstance(at, datetime) else T0 + at
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": id or f"e{next(_ids)}",
        "source": source,
        "type": etype,
        "subject": tenant,
        "time": t.isoformat().replace("+00:00", "Z"),
    }
    if data is not None:
        body["data"] = data
    return orjson.dumps(body)


class Msg:
    """What the validator reads of a Kafka message: value, offset, timestamp (0: unknown),
    headers (a binary-mode CloudEvent's)."""

    def __init__(self, value: bytes | None, offset: int, ts_ms: int = 0, headers: list[tuple[str, bytes]] | None = None) -> None:
        self._v, self._o, self._t, self._h = value, offset, ts_ms, headers

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._h

    def value(self) -> bytes | None:
        return self._v

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, int]:
        return (1, self._t)


class Harness:
    """Validator + one engine, driven like the dataflow drives them."""

    def __init__(self, cfg: EngineConfig | None = None, catalog: dict[str, Any] | None = None) -> None:
        self.stats = Stats()
        self.index = CatalogIndex.build(parse_catalog(catalog or CATALOG))
        self.validator = Validator(self.index, self.stats)
        self.cfg = cfg or EngineConfig(idle_timeout_s=30)
        self.engine = ShardEngine(self.validator, self.cfg, self.stats)
        self.offset = 0
        self.now_ms = int(datetime(2026, 11, 30, tzinfo=UTC).timestamp() * 1000)  # the wall clock for future_time
        self.alerts: list[Any] = []
        self.lines: list[Any] = []
        self.dead: list[DeadLetter] = []

    def accept(self, *values: bytes) -> list[Accepted]:
        acc: list[Accepted] = []
        batch = [Msg(v, self.offset + i) for i, v in enumerate(values)]
        self.validator.parse_batch(batch, "usage.events", 0, "now", acc, self.dead, self.now_ms)
        self.offset += len(values)
        return acc

    def route(self, *values: bytes) -> list[Item]:
        """The dataflow's intake: the events, decoded, for the engine to judge (dead letters
        of undecodable messages go to `dead`)."""
        batch = [Msg(v, self.offset + i) for i, v in enumerate(values)]
        groups, dead = self.validator.route(batch, "usage.events", 0, "now", self.now_ms, lambda _: "")
        self.dead += dead
        self.offset += len(values)
        return groups.get("", [])

    def feed(self, *values: bytes, now: float = 1000.0) -> Any:
        """As the dataflow does it: route, then judge and apply in the engine's one pass."""
        out = self.engine.process(self.route(*values), "usage.events", 0, now, "now")
        self.alerts += out.alerts
        self.lines += out.lines
        self.dead += out.dead
        return out

    def flush(self) -> Any:
        out = self.engine.flush_all()
        self.lines += out.lines
        return out


def hostile(
    total: int, tenants: int, seed: int, start: datetime = MONTH_END, span: timedelta = timedelta(minutes=40), rate: float | None = None
) -> GenSpec:
    """Generated traffic with 2 % duplicates, 2 % late and 1 % malformed events; by default
    across a month end, so a period closes during the run."""
    return GenSpec(total=total, tenants=tenants, duplicate_pct=2, late_pct=2, malformed_pct=1, seed=seed, start=start, span=span, rate=rate)
