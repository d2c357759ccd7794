"""`make bench`, the `api` figures: `tallyflow api` as its own process (one uvicorn worker),
loaded by a bounded async client on loopback (aiohttp: httpx's async client tops out near
600 requests/s on a core here, which would measure the client, not the API).

* `freshness_p99_ms`: a probe event produced -> visible in GET /v1/tenants/{t}/usage, while
  the rating dataflow (a process) takes a steady 20k events/s of other tenants' traffic;
* `entitlement_p99_ms`: GET /v1/tenants/{t}/entitlements/{meter} at a fixed 2,000
  requests/s (open loop: latency counts from when a request was due, so a stalled server
  is not hidden by a client that waits for it);
* `ingest_events_per_s`: POST /v1/events, batches of 100 CloudEvents, from a fixed number
  of concurrent clients, counting only events answered 202 (acknowledged by the broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import yaml
from confluent_kafka import Producer

from dataflows import FLOWS
from devkit.generator import GenSpec, events, produce
from devkit.pipeline import wait_until
from devkit.stack import free_port
from runtime.settings import Settings, to_env
from schemas.catalog import load_catalog

TOKEN = "bench-token-0123456789abcdef"
PROBE_TENANT = "t-1000"  # the generated traffic uses the first 999 tenants
PROBE_METER = "api_calls"


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"p50": round(xs[len(xs) // 2] * 1000, 2), "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000, 2), "n": len(xs)}


def api_bench(s: Settings, tmp: Path, seconds: float = 15.0) -> dict[str, Any]:
    """Run in a process of its own (`devkit.bench_runs api`): a client sharing a heap with
    the rest of the bench would measure that heap's garbage collections. The topics of `s`
    exist, empty."""
    gc.collect()
    gc.freeze()
    s = s.replace(api_tokens_file=str(_tokens(tmp)), catalog_reload_seconds=0)
    env = {**to_env(s), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    logs = tmp / "api-bench.log"
    api = subprocess.Popen(
        [sys.executable, "-m", "tallyflow.cli", "api", "--port", str(port)], env=env, stdout=logs.open("ab"), stderr=subprocess.STDOUT
    )
    rating = subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", FLOWS["rate"]], env=env, stdout=logs.open("ab"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), 30, "the API to answer")
        out: dict[str, Any] = {"freshness": asyncio.run(_freshness(s, url, seconds))}
        rating.terminate()
        rating.wait(30)
        out["entitlement"] = asyncio.run(_entitlements(url, rate=2000, seconds=seconds))
        out["ingest"] = asyncio.run(_ingest(s, url, seconds=seconds))
    finally:
        for p in (rating, api):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    return {
        "entitlement_p99_ms": out["entitlement"]["latency_ms"].get("p99"),
        "ingest_events_per_s": out["ingest"]["events_per_s"],
        "freshness_p99_ms": out["freshness"]["latency_ms"].get("p99"),
        **out,
    }


def _tokens(tmp: Path) -> Path:
    path = tmp / "api-tokens.yaml"
    path.write_text(yaml.safe_dump({"clients": [{"name": "bench", "token": TOKEN, "scopes": ["ingest", "read"], "rate_per_second": 1e9}]}))
    return path


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _client(url: str, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def _freshness(s: Settings, url: str, seconds: float, rate: float = 20_000) -> dict[str, Any]:
    """Probe events of a tenant of their own, one every 100 ms, while the generator keeps the
    rating dataflow at `rate` events/s; each probe's time from produce to the API showing it."""
    cat = load_catalog(s.process.catalog)
    spec = GenSpec(total=int(rate * (seconds + 5)), tenants=999, rate=rate, span=timedelta(seconds=seconds + 5))
    load = threading.Thread(target=produce, args=(s.kafka.brokers, s.topics.input, spec, cat), daemon=True)
    producer = Producer({"bootstrap.servers": s.kafka.brokers, "linger.ms": 0})
    latencies: list[float] = []
    async with _client(url, 4) as c:

        async def seen() -> float:
            async with c.get(f"/v1/tenants/{PROBE_TENANT}/usage", params={"meter": PROBE_METER}) as r:
                return float(orjson.loads(await r.read())["meters"][PROBE_METER]["quantity"])

        base = await seen()
        load.start()
        await asyncio.sleep(3)  # let the load reach its rate before probing; a warm-up, not a synchronisation
        t_end = time.monotonic() + seconds
        k = 0
        with _no_gc():
            while time.monotonic() < t_end:
                k += 1
                t0 = time.monotonic()
                producer.produce(s.topics.input, _probe(k), PROBE_TENANT.encode())
                producer.flush(10)
                while await seen() < base + k:
                    if time.monotonic() - t0 > 10:
                        raise RuntimeError(f"probe {k} not visible in the API after 10 s")
                    await asyncio.sleep(0.002)  # the poll period of the probe, not a synchronisation
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
    load.join(seconds + 60)
    return {"load_events_per_s": rate, "probes": len(latencies), "latency_ms": _percentiles(latencies)}


def _probe(k: int) -> bytes:
    """The k-th probe: one API call of the probe tenant, now."""
    body = {
        "specversion": "1.0",
        "id": f"probe-{k}-{time.time_ns()}",
        "source": "bench/probe",
        "type": "api.request",
        "subject": PROBE_TENANT,
        "time": _iso(datetime.now(UTC)),
    }
    return orjson.dumps(body)


async def _entitlements(url: str, rate: float, seconds: float, connections: int = 32) -> dict[str, Any]:
    """Requests start at their due times whatever the answers do (open loop); each one's
    latency counts from its due time, so a stall shows up in every request it delays."""
    rng = random.Random(3)
    tenants = [f"t-{i:04d}" for i in range(1, 1000)]
    latencies: list[float] = []
    errors = 0
    n = int(rate * seconds)
    gate = asyncio.Semaphore(connections)
    running: set[asyncio.Task[None]] = set()
    async with _client(url, connections) as c:

        async def one(due: float, tenant: str) -> None:
            nonlocal errors
            async with gate, c.get(f"/v1/tenants/{tenant}/entitlements/{PROBE_METER}") as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append(time.monotonic() - due)

        start = time.monotonic()
        with _no_gc():
            for i in range(n):
                due = start + i / rate
                ahead = due - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)  # the request's due time, not a synchronisation
                task = asyncio.create_task(one(due, rng.choice(tenants)))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
        took = time.monotonic() - start
    return {"requests": n, "requests_per_s": round(n / took), "errors": errors, "latency_ms": _percentiles(latencies)}


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No collections in the load client while it measures: its own pauses would be counted
    as the server's latency."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _ingest(s: Settings, url: str, seconds: float, batch: int = 100, clients: int = 16) -> dict[str, Any]:
    cat = load_catalog(s.process.catalog)
    spec = GenSpec(total=400_000, tenants=1000, duplicate_pct=0, late_pct=0, malformed_pct=0, seed=21)
    values = [v for _, _, v, _ in events(spec, cat)]
    bodies = [b"[" + b",".join(values[i : i + batch]) + b"]" for i in range(0, len(values) - batch + 1, batch)]
    accepted = refused = requests = 0
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    async with _client(url, clients) as c:
        stop = time.monotonic() + seconds
        next_body = iter(bodies)

        async def worker() -> None:
            nonlocal accepted, refused, requests
            while time.monotonic() < stop:
                body = next(next_body, None)
                if body is None:
                    return
                async with c.post("/v1/events", data=body, headers=headers) as r:
                    raw = await r.read()
                    requests += 1
                    if r.status in (202, 400):
                        ans = orjson.loads(raw)
                        accepted += ans["accepted"]
                        refused += len(ans["refused"])

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        took = time.monotonic() - t0
    return {
        "batch": batch,
        "clients": clients,
        "requests": requests,
        "events_accepted": accepted,
        "events_refused": refused,
        "events_per_s": round(accepted / took),
    }
