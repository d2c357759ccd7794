"""`make bench`: the rating dataflow against a hand-written confluent-kafka + msgspec loop
doing the same work on the same input, in one run, printed as JSON (ratios, not absolute
times, are what to compare across these noisy machines)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import msgspec
from confluent_kafka import TopicPartition

from devkit.generator import GenSpec, produce
from devkit.stack import LocalStack
from operators.catalog_index import CatalogIndex
from operators.dedup import GenerationalDedup
from operators.engine import ShardEngine
from operators.engine_state import Out
from operators.periods import iso
from operators.sharding import Sharder
from operators.stats import Stats
from operators.validate import Validator
from runtime import kafka
from runtime.settings import Settings, StoreSettings, load_settings, tune_gc
from schemas.catalog import load_catalog
from schemas.outputs import ENCODER, DeadLetter
from schemas.records import Accepted


def reference_loop(s: Settings, end_offsets: Mapping[int, int]) -> Stats:
    """The bar: one consumer, the same operators, outputs produced to the same topics."""

    stats = Stats()
    cat = CatalogIndex.build(load_catalog(s.process.catalog))
    validator = Validator(cat, stats, s.limits)
    cfg = s.engine.config()
    engines: dict[str, ShardEngine] = {}
    sharder = Sharder(s.engine.shards)
    consumer = kafka.consumer(s.kafka.brokers)
    consumer.assign([TopicPartition(s.topics.input, p, 0) for p in end_offsets])
    producer = kafka.producer(s.kafka.brokers)
    remaining = {p: e for p, e in end_offsets.items() if e > 0}

    def emit(topic: str, items: list[Any]) -> None:
        for it in items:
            while True:
                try:
                    producer.produce(topic, ENCODER.encode(it), it.tenant_id.encode() if it.tenant_id else None)
                    break
                except BufferError:
                    producer.poll(0.05)

    def emit_out(o: Out) -> None:
        emit(s.topics.alerts, o.alerts)
        emit(s.topics.rated, o.lines)
        emit(s.topics.dlq, o.dead)

    while remaining:
        msgs = consumer.consume(s.kafka.batch_size, 0.1)
        if not msgs:
            continue
        now = time.time()
        received = iso(int(now * 1000))
        by_part: dict[int, list[tuple[bytes | None, int, int]]] = {}
        for m in msgs:
            p, off = m.partition(), m.offset()
            if m.error() is None and p is not None and off is not None:
                by_part.setdefault(p, []).append((m.value(), off, m.timestamp()[1]))
        accepted: list[Accepted] = []
        dead: list[DeadLetter] = []
        for p, vals in by_part.items():
            validator.parse_batch(vals, s.topics.input, p, received, accepted, dead, int(now * 1000))
            if vals[-1][1] + 1 >= remaining.get(p, 0):
                remaining.pop(p, None)
        emit(s.topics.dlq, dead)
        for shard, batch in sharder.group(accepted).items():
            eng = engines.get(shard)
            if eng is None:
                eng = engines[shard] = ShardEngine(cat, cfg, stats)
            emit_out(eng.process(batch, now, received))
        producer.poll(0)
    for eng in engines.values():
        emit_out(eng.flush_all())
    producer.flush()
    consumer.close()
    return stats


def run_dataflow(s: Settings, end_offsets: Mapping[int, int]) -> Stats:
    from bytewax._bytewax import cli_main

    from dataflows.rating import Bounds, build_flow

    stats = Stats()
    # No recovery store in these runs (nor in the reference), so no snapshots either.
    cli_main(build_flow(s, bounds=Bounds(end_offsets), stats=stats, snapshots=False))  # type: ignore[no-untyped-call]
    return stats


def dedup_store_keys_per_s(url: str, n: int = 200_000, batch: int = 1000) -> dict[str, float]:
    """The long-horizon dedup store alone, one Lua call per batch of `batch` new ids:
    recorded in the background (every accepted event) and checked (events memory cannot judge)."""
    from state.dedup_store import DedupStore

    store = DedupStore(StoreSettings(redis_url=url, redis_prefix="bench-store", dedup_store_days=7))
    evs = [Accepted("t-0001", "starter:v1", f"svc/llm\x1f7-{i:09d}", str(i), 0, [], b"", "t", 0, i, None) for i in range(2 * n)]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        store.record(evs[i : i + batch])
    store.drain()
    t1 = time.perf_counter()
    for i in range(n, 2 * n, batch):
        store.duplicates(evs[i : i + batch])
    t2 = time.perf_counter()
    return {"record": round(n / (t1 - t0)), "check": round(n / (t2 - t1))}


WARM_UP_S = 3.0


def delivery_bench(events: int, rate: float) -> dict[str, Any]:
    """Alert latency (event produced -> received by the CRM sandbox) under a steady load, with
    all three dataflows running as processes, and ERP efficiency (events per request)."""
    from devkit.pipeline import LocalPipeline, wait_until
    from runtime.kafka import read_topic
    from schemas.outputs import RatedUsageLine, ThresholdAlert

    # Measure the pipeline, not a rate limit: this load fires ~150 alerts/s at first, above
    # the default 100 requests/s per destination, which would queue them by design.
    limits = {"TALLYFLOW_CRM_RATE_PER_SECOND": "1000", "TALLYFLOW_SUCCESS_RATE_PER_SECOND": "1000"}
    with LocalPipeline(limits) as lp:
        s = lp.settings
        lp.start_all()
        sent_at: dict[str, float] = {}
        spec = GenSpec(total=events, span=timedelta(seconds=events / 20_000), rate=rate)
        gen = produce(s.kafka.brokers, s.topics.input, spec, load_catalog(s.process.catalog), sent_at=sent_at)

        lp.wait_rated(events, 300)
        alerts = [msgspec.json.decode(v, type=ThresholdAlert) for v in read_topic(s.kafka.brokers, s.topics.alerts)]
        n_lines = len(read_topic(s.kafka.brokers, s.topics.rated))
        n_crm = sum(1 for a in alerts if "crm" in a.destinations)
        wait_until(
            lambda: (st := lp.sandbox.state())["crm"]["accepted"] >= n_crm and st["erp"]["accepted"] >= n_lines, 300, "delivery to finish"
        )
        crm = lp.sandbox.items("crm")
        erp_lines = [msgspec.convert(x, RatedUsageLine, strict=False) for x in lp.sandbox.items("erp").values()]
        erp_ok = sum(1 for _, st in lp.sandbox.requests("erp") if st == 200)
    # Steady state: the first seconds measure connection and fetch ramp-up, not the pipeline.
    t0 = min(sent_at.values())
    got = [a for a in alerts if a.alert_id in crm and sent_at[a.correlation_id] - t0 >= WARM_UP_S]
    detected = {a.alert_id: datetime.fromisoformat(a.detected_at.replace("Z", "+00:00")).timestamp() for a in got}
    total = [crm[a.alert_id]["received_at"] - sent_at[a.correlation_id] for a in got]
    rating = [detected[a.alert_id] - sent_at[a.correlation_id] for a in got]
    delivery = [crm[a.alert_id]["received_at"] - detected[a.alert_id] for a in got]
    return {
        "load_events_per_s": round(gen.produced / gen.seconds),
        "alerts": len(got),
        "warm_up_excluded_s": WARM_UP_S,
        "alert_latency_ms": _percentiles(total),
        "of_which_rating_ms": _percentiles(rating),  # event produced -> alert fired (includes consumer lag)
        "of_which_delivery_ms": _percentiles(delivery),  # alert fired -> received by the CRM
        "erp_requests": erp_ok,
        "erp_lines_per_request": round(len(erp_lines) / max(1, erp_ok), 1),
        "erp_events_per_request": round(sum(ln.event_count for ln in erp_lines) / max(1, erp_ok), 1),
        "crm_and_success_rate_limit_per_s": 1000,
        "target": {"alert_latency_p99_ms": 250},
    }


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def at(q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(xs[-1] * 1000, 1)} if xs else {}


def dedup_bytes_per_id(n: int = 200_000) -> float:
    """Memory the dedup window holds per live id (keys shaped like the generator's)."""
    tracemalloc.start()
    d = GenerationalDedup(3_600_000)
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        d.seen(f"svc/llm\x1f7-{i:09d}")
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / n


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--events", type=int, default=1_000_000, help="events of the throughput runs")
    ap.add_argument("--partitions", type=int, default=4, help="partitions of the input topic")
    ap.add_argument("--rounds", type=int, default=3, help="alternate reference and dataflow runs; the best of each counts")
    ap.add_argument("--delivery-events", type=int, default=750_000, help="events for the alert-latency run (0: skip it)")
    ap.add_argument("--delivery-rates", default="20000,50000", help="steady loads of the alert-latency runs, events/s")


def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {"events": args.events, "partitions": args.partitions}
    with LocalStack(redis=True) as st:
        # The reference loop does the in-memory work only; "dataflow" does the same, and
        # "dataflow_with_redis" adds the long-horizon dedup store and the emission register.
        s = load_settings(brokers=st.brokers, redis_url=st.redis_url, dedup_store_days=0, emission_register=False)
        st.create_topics({s.topics.input: args.partitions, s.topics.alerts: 1, s.topics.rated: 1, s.topics.dlq: 1})
        cat = load_catalog(s.process.catalog)
        # Traffic of 1,000 tenants at 20k events/s of event time: 1-minute windows fill up.
        spec = GenSpec(total=args.events, span=timedelta(seconds=args.events / 20_000))
        gen = produce(st.brokers, s.topics.input, spec, cat, progress=sys.stderr.isatty())
        results["produce_events_per_s"] = round(gen.produced / gen.seconds)
        tune_gc()
        ref_rates, flow_rates, redis_rates = [], [], []
        for i in range(args.rounds):
            t0 = time.perf_counter()
            ref = reference_loop(s, gen.end_offsets)
            ref_rates.append(args.events / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            flow = run_dataflow(s, gen.end_offsets)
            flow_rates.append(args.events / (time.perf_counter() - t0))
            # A fresh key space per round: a register that has seen the lines emits nothing.
            with_redis = s.replace(dedup_store_days=7.0, emission_register=True, redis_prefix=f"bench-{i}")
            t0 = time.perf_counter()
            flow_r = run_dataflow(with_redis, gen.end_offsets)
            redis_rates.append(args.events / (time.perf_counter() - t0))
            for name, stt in (("reference", ref), ("dataflow", flow), ("dataflow_with_redis", flow_r)):
                if stt.conservation_gap() != 0 or stt.records_in != args.events:
                    raise SystemExit(f"{name} lost records: {stt}")
            # Line counts may differ (late events sharing a batch share a correction); money may not.
            for stt in (flow, flow_r):
                if (ref.accepted, ref.duplicates, ref.dead, ref.amount) != (stt.accepted, stt.duplicates, stt.dead, stt.amount):
                    raise SystemExit(f"reference and dataflow disagree: {ref} vs {stt}")
        results.update(
            dataflow_events_per_s=round(max(flow_rates)),
            reference_events_per_s=round(max(ref_rates)),
            ratio=round(max(flow_rates) / max(ref_rates), 3),
            dataflow_with_redis_events_per_s=round(max(redis_rates)),
            redis_cost_ratio=round(max(redis_rates) / max(flow_rates), 3),  # with / without dedup store + register
            dedup_store_keys_per_s=dedup_store_keys_per_s(st.redis_url),
            rated_lines=flow.lines,
            alerts=sum(flow.alerts.values()),
            dedup_bytes_per_live_id=round(dedup_bytes_per_id(), 1),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            target={"dataflow_events_per_s": 250_000, "ratio": 0.7},
        )
    if args.delivery_events:
        for rate in (float(r) for r in args.delivery_rates.split(",")):
            results[f"delivery_at_{rate / 1000:g}k_events_per_s"] = delivery_bench(args.delivery_events, rate)
    print(json.dumps(results, indent=2))
    return 0
