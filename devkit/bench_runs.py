"""One measured run of `make bench`, each in a process of its own (so runs share no heap,
GC state or caches, and each reports its own RSS):

    python -m devkit.bench_runs KIND '{"...": ...}'   ->  one JSON line

KIND is `lean` (the physical-limit reference: confluent-kafka + msgspec, decode, dedup per
tenant in a dict, sum per tenant, meter and minute), `reference` (the same operators as the
dataflow in a plain loop, no Bytewax), `dataflow` (the rating dataflow, settings from the
config), or `catalog` (load a catalog file: seconds and memory).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
from confluent_kafka import TopicPartition

from runtime import kafka
from runtime.settings import Settings, load_settings


def rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _LeanData(msgspec.Struct):
    tokens: int = 1


class _LeanEvent(msgspec.Struct):
    id: str
    source: str
    subject: str
    type: str
    time: Annotated[datetime, msgspec.Meta(tz=True)]
    data: _LeanData | None = None


def _consumer(brokers: str, topic: str, ends: Mapping[int, int]) -> Any:
    c = kafka.consumer(brokers)
    c.assign([TopicPartition(topic, p, 0) for p in ends])
    return c


def lean(brokers: str, topic: str, ends: Mapping[int, int]) -> dict[str, Any]:
    """The least a Python consumer can do with these events: the bar the dataflow is held to."""
    decode = msgspec.json.Decoder(_LeanEvent).decode
    c = _consumer(brokers, topic, ends)
    seen: dict[str, set[tuple[str, str]]] = {}
    sums: dict[tuple[str, str, int], int] = {}
    remaining = {p: e for p, e in ends.items() if e > 0}
    n = 0
    t0 = time.perf_counter()
    while remaining:
        for m in c.consume(1000, 0.1):
            n += 1
            off = m.offset() or 0
            if off + 1 >= remaining.get(m.partition() or 0, 0):
                remaining.pop(m.partition() or 0, None)
            try:
                e = decode(m.value() or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            ids = seen.get(e.subject)
            if ids is None:
                ids = seen[e.subject] = set()
            k = (e.source, e.id)
            if k in ids:
                continue
            ids.add(k)
            key = (e.subject, e.type, int(e.time.timestamp()) // 60)
            sums[key] = sums.get(key, 0) + (e.data.tokens if e.data is not None else 1)
    seconds = time.perf_counter() - t0
    c.close()
    return {"events_per_s": round(n / seconds), "events": n, "keys": len(sums), "rss_mb": round(rss_mb(), 1)}


def reference(s: Settings, ends: Mapping[int, int]) -> dict[str, Any]:
    """The dataflow's operators in a plain loop (one consumer, one engine per shard)."""
    from devkit.reference_loop import run

    t0 = time.perf_counter()
    stats = run(s, ends)
    seconds = time.perf_counter() - t0
    return {
        "events_per_s": round(stats.records_in / seconds),
        "records": stats.records_in,
        "amount": {k: str(v) for k, v in stats.amount.items()},
    }


def dataflow(s: Settings, ends: Mapping[int, int]) -> dict[str, Any]:
    """The rating dataflow as `tallyflow rate` runs it, over a bounded input, no recovery."""
    from bytewax._bytewax import cli_main

    from dataflows.rating import Bounds, build_flow
    from operators.stats import Stats
    from runtime.settings import tune_gc

    stats = Stats()
    t_build = time.perf_counter()
    flow = build_flow(s, bounds=Bounds(ends), stats=stats, snapshots=False)
    tune_gc()
    start_rss = rss_mb()
    t0 = time.perf_counter()
    cli_main(flow)  # type: ignore[no-untyped-call]
    seconds = time.perf_counter() - t0
    if stats.conservation_gap() != 0:
        raise SystemExit(f"records lost: {stats}")
    return {
        "events_per_s": round(stats.records_in / seconds),
        "records": stats.records_in,
        "accepted": stats.accepted,
        "duplicates": stats.duplicates,
        "lines": stats.lines,
        "alerts": sum(stats.alerts.values()),
        "amount": {k: str(v) for k, v in stats.amount.items()},
        "build_s": round(t0 - t_build, 2),
        "rss_before_first_event_mb": round(start_rss, 1),
        "rss_mb": round(rss_mb(), 1),
        "read_model_docs": stats.read_model_docs,
        "read_model_share": round(stats.read_model_seconds / seconds, 4),
    }


def catalog(path: str) -> dict[str, Any]:
    """Loading and indexing a catalog file, as the rating dataflow does at start-up."""
    from operators.catalog_index import CatalogIndex
    from schemas.catalog import load_catalog

    before = rss_now_mb()
    t0 = time.perf_counter()
    idx = CatalogIndex.build(load_catalog(path))
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "rss_mb": round(rss_now_mb() - before, 1), "tenants": len(idx.tenants)}


def main(argv: list[str]) -> int:
    kind, cfg = argv[0], json.loads(argv[1])
    ends = {int(p): e for p, e in cfg.get("ends", {}).items()}
    if kind == "lean":
        out = lean(cfg["brokers"], cfg["topic"], ends)
    elif kind == "catalog":
        out = catalog(cfg["path"])
    elif kind == "api":
        from devkit.bench_api import api_bench

        out = api_bench(load_settings({}, **cfg["settings"]), Path(cfg["tmp"]), cfg["seconds"])
    else:
        s = load_settings({}, **cfg["settings"])
        out = reference(s, ends) if kind == "reference" else dataflow(s, ends)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
