"""`make bench`, the `api` figures: `tallyflow api` as its own process (one uvicorn worker),
loaded from this process (its own: a client sharing a heap with the rest of the bench would
measure that heap's garbage collections).

* `hello_capacity_rps`, `entitlement_capacity_rps`, `ratio_entitlement_to_hello`: the highest
  request rate one process sustains with p99 <= 5 ms, for a trivial endpoint on the same
  server stack (`hello_app`: the same uvicorn configuration, bounds and start-up as
  `tallyflow api`, an ASGI app answering a constant JSON body) and for
  GET /v1/tenants/{t}/entitlements/{meter} over 999 tenants' documents with usage. Found by a
  closed-loop ramp (`_ramp`): a fixed set of keep-alive connections, each sending its next
  request when the previous is answered, at a target rate raised step by step until a step
  misses p99 <= 5 ms or its rate; a request whose due time passed while every connection
  was busy counts its latency from that due time (so saturation shows as latency, not as a
  slower client). Two alternating rounds, the best of each, in the same run: the ratio is
  what to compare across machines. The server's CPU per request (`*_cpu_us_per_request`)
  is read from /proc at the highest passing step.
* `entitlement_p99_ms`: the same requests at half the measured entitlement capacity, for
  `seconds` (a request's latency counts from its due time).
* `freshness_p99_ms`: a probe event produced -> visible in GET /v1/tenants/{t}/usage, while
  the rating dataflow (a process) takes a steady 20k events/s of other tenants' traffic;
  `freshness.read_model_share` is the part of that time the rating process spent on the
  read model (its own counter, as `read_model_cost` in the throughput runs), and
  `freshness.rating_cpu_share` all its CPU over the same time.
* `ingest_events_per_s`: POST /v1/events, batches of 100 CloudEvents, from a fixed number
  of concurrent clients, counting only events answered 202 (acknowledged by the broker).

The load client for the ramps is raw HTTP/1.1 on asyncio with httptools' parser (aiohttp's
client tops out below the server it would measure: it costs more per request than the
trivial endpoint does).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import httptools
import httpx
import orjson
import uvloop
import yaml
from confluent_kafka import Producer
from starlette.types import ASGIApp, Receive, Scope, Send

from dataflows import FLOWS
from devkit.generator import DEFAULT_START, GenSpec, events, produce
from devkit.pipeline import wait_until
from devkit.stack import free_port
from operators.catalog_index import CatalogIndex
from operators.periods import period_of
from operators.usage import plan_in_force
from runtime.settings import Settings, load_settings, to_env
from schemas.catalog import load_catalog

TOKEN = "bench-token-0123456789abcdef"
PROBE_TENANT = "t-1000"  # the generated traffic uses the first 999 tenants
PROBE_METER = "api_calls"
P99_BUDGET_MS = 5.0  # a rate is sustained while p99 stays within this
HELLO = b'{"hello":"world"}'


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"p50": round(xs[len(xs) // 2] * 1000, 2), "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000, 2), "n": len(xs)}


def hello_app(_: Settings) -> ASGIApp:
    """The trivial endpoint the entitlement check is measured against: GET /hello answers a
    constant JSON body, as a bare ASGI app served by serving.server.serve as `tallyflow api`
    is (uvicorn with httptools and uvloop, the same bounds and start-up): what the HTTP stack
    alone costs per request."""

    async def hello(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        found = scope["path"] == "/hello"
        body = HELLO if found else b'{"error":"not found"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200 if found else 404, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return hello


def api_bench(s: Settings, tmp: Path, seconds: float = 15.0) -> dict[str, Any]:
    """Run in a process of its own (`devkit.bench_runs api`): a client sharing a heap with
    the rest of the bench would measure that heap's garbage collections. The topics of `s`
    exist, empty."""
    gc.collect()
    gc.freeze()
    rating_metrics = free_port()
    s = s.replace(api_tokens_file=str(_tokens(tmp)), catalog_reload_seconds=0)
    env = {**to_env(s), "PYTHONUNBUFFERED": "1"}
    port, hello_port = free_port(), free_port()
    logs = tmp / "api-bench.log"

    def start(*args: str, **more: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, *args], env={**env, **more}, stdout=logs.open("ab"), stderr=subprocess.STDOUT)

    api = start("-m", "tallyflow.cli", "api", "--port", str(port))
    rating = start("-m", "bytewax.run", FLOWS["rate"], TALLYFLOW_METRICS_PORT=str(rating_metrics))
    hello: subprocess.Popen[bytes] | None = None
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), 30, "the API to answer")
        wait_until(lambda: _up(f"http://127.0.0.1:{rating_metrics}"), 60, "the rating dataflow to serve its metrics")
        out: dict[str, Any] = {"freshness": asyncio.run(_freshness(s, url, seconds, rating, rating_metrics))}
        rating.terminate()
        rating.wait(30)
        hello = start("-m", "devkit.bench_api", "hello", str(hello_port))
        wait_until(lambda: _up(f"http://127.0.0.1:{hello_port}", "/hello"), 30, "the trivial endpoint to answer")
        ent_paths = _entitlement_paths(s)
        targets = {"hello": (hello_port, hello.pid, ["/hello"]), "entitlement": (port, api.pid, ent_paths)}
        out["capacity"] = uvloop.run(_capacities(targets))
        cap = out["capacity"]["entitlement"]["capacity_rps"]
        half = uvloop.run(_step(port, _requests(ent_paths), max(cap / 2, 100), seconds, pid=api.pid))
        out["entitlement"] = {**half, "load": "half the measured capacity"}
        out["ingest"] = asyncio.run(_ingest(s, url, seconds=seconds))
    finally:
        for p in (rating, api, hello):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)
    hello_rps, ent_rps = out["capacity"]["hello"]["capacity_rps"], out["capacity"]["entitlement"]["capacity_rps"]
    return {
        "hello_capacity_rps": hello_rps,
        "entitlement_capacity_rps": ent_rps,
        "ratio_entitlement_to_hello": round(ent_rps / max(1, hello_rps), 3),
        "hello_cpu_us_per_request": out["capacity"]["hello"]["cpu_us_per_request"],
        "entitlement_cpu_us_per_request": out["capacity"]["entitlement"]["cpu_us_per_request"],
        "entitlement_p99_ms": out["entitlement"]["latency_ms"].get("p99"),
        "ingest_events_per_s": out["ingest"]["events_per_s"],
        "freshness_p99_ms": out["freshness"]["latency_ms"].get("p99"),
        **out,
    }


def _tokens(tmp: Path) -> Path:
    path = tmp / "api-tokens.yaml"
    path.write_text(yaml.safe_dump({"clients": [{"name": "bench", "token": TOKEN, "scopes": ["ingest", "read"], "rate_per_second": 1e9}]}))
    return path


def _up(url: str, path: str = "/healthz") -> bool:
    try:
        return httpx.get(url + path, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _client(url: str, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def _freshness(
    s: Settings, url: str, seconds: float, rating: subprocess.Popen[bytes], metrics_port: int, rate: float = 20_000
) -> dict[str, Any]:
    """Probe events of a tenant of their own, one every 100 ms, while the generator keeps the
    rating dataflow at `rate` events/s; each probe's time from produce to the API showing it,
    and what the rating process spent meanwhile (all its CPU; the read model's part)."""
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
        t_start = time.monotonic()
        t_end = t_start + seconds
        cpu0, rm0 = _cpu_seconds(rating.pid), _read_model_seconds(metrics_port)
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
        took = time.monotonic() - t_start
        cpu, rm = _cpu_seconds(rating.pid) - cpu0, _read_model_seconds(metrics_port) - rm0
    load.join(seconds + 60)
    return {
        "load_events_per_s": rate,
        "probes": len(latencies),
        "latency_ms": _percentiles(latencies),
        "rating_cpu_share": round(cpu / took, 3),
        "read_model_share": round(rm / took, 3),
        "read_model_of_rating_cpu": round(rm / max(cpu, 1e-9), 3),
    }


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_model_seconds(port: int) -> float:
    """The rating process's own count of the time it spent on the read model (its /metrics)."""
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith("tallyflow_read_model_seconds_total "):
            return float(line.split()[1])
    return 0.0


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


def _entitlement_paths(s: Settings) -> list[str]:
    """An entitlement check of each generated tenant in the period its generated usage is in
    (the rating dataflow wrote their documents during the freshness phase)."""
    cat = CatalogIndex.build(load_catalog(s.process.catalog))
    at = int(DEFAULT_START.timestamp() * 1000)
    paths = []
    for i in range(1, 1000):
        tenant = f"t-{i:04d}"
        plan = plan_in_force(cat, tenant, at)
        if plan is not None and PROBE_METER in plan.meters:
            paths.append(f"/v1/tenants/{tenant}/entitlements/{PROBE_METER}?period={period_of(at, plan.billing_period).key}")
    return paths


def _requests(paths: list[str]) -> list[bytes]:
    return [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode() for p in paths]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a request, then its answer (httptools parses it)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is one without deriving from it

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done():
            answer.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done():
            answer.set_exception(ConnectionError("the server closed the connection"))

    async def ask(self, request: bytes) -> int:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.answer


async def _step(port: int, requests: list[bytes], rate: float, seconds: float, pid: int | None = None, conns: int = 32) -> dict[str, Any]:
    """`rate` requests/s for `seconds` over `conns` keep-alive connections, each sending its
    next request when the previous is answered (closed loop). Request i is due at
    start + i / rate; its latency counts from that due time if every connection was busy then
    (queueing behind a slow server is the server's), else from when it was sent (a timer
    waking late is the client's)."""
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(_Connection, "127.0.0.1", port))[1] for _ in range(conns)]
    latencies: list[float] = []
    errors = 0
    due_of = itertools.count()
    start = time.monotonic() + 0.05
    end = start + seconds
    n = len(requests)

    async def run(c: _Connection) -> None:
        nonlocal errors
        while True:
            i = next(due_of)
            due = start + i / rate
            if due >= end:
                return
            ahead = due - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)  # the request's due time, not a synchronisation
                due = time.monotonic()
            try:
                status = await c.ask(requests[i % n])
            except ConnectionError:
                errors += 1
                return
            latencies.append(time.monotonic() - due)
            if status != 200:
                errors += 1

    cpu0 = _cpu_seconds(pid) if pid else 0.0
    with _no_gc():
        await asyncio.gather(*(run(c) for c in connections))
    took = time.monotonic() - start
    cpu = _cpu_seconds(pid) - cpu0 if pid else 0.0
    for c in connections:
        if c.transport is not None:
            c.transport.close()
    out: dict[str, Any] = {
        "rate": round(rate),
        "requests_per_s": round(len(latencies) / took),
        "errors": errors,
        "latency_ms": _percentiles(latencies),
    }
    if pid:
        out["cpu_us_per_request"] = round(cpu * 1e6 / max(1, len(latencies)), 1)
    return out


def _passes(step: dict[str, Any]) -> bool:
    return not step["errors"] and step["requests_per_s"] >= 0.97 * step["rate"] and step["latency_ms"].get("p99", 1e9) <= P99_BUDGET_MS


async def _ramp(port: int, pid: int, requests: list[bytes], start_rps: float, step_s: float = 1.5, factor: float = 1.25) -> dict[str, Any]:
    """The highest rate a step passes (p99 <= 5 ms at the rate asked, no errors): rates rise
    by `factor` from `start_rps`; a failed step is tried once more (these machines are
    shared), and the first rate failed twice ends the ramp after one step between it and the
    last passed."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    rate = start_rps
    while True:
        step = await _step(port, requests, rate, step_s, pid)
        if not _passes(step):
            step = await _step(port, requests, rate, step_s, pid)
        steps.append(step)
        if not _passes(step):
            break
        best, rate = step, rate * factor
    if best is not None:  # one step between the last rate passed and the first failed
        mid = await _step(port, requests, (best["rate"] * rate) ** 0.5, step_s, pid)
        steps.append(mid)
        if _passes(mid):
            best = mid
    return {
        "capacity_rps": best["requests_per_s"] if best else 0,
        "cpu_us_per_request": best.get("cpu_us_per_request") if best else None,
        "steps": [(x["rate"], x["requests_per_s"], x["latency_ms"].get("p99")) for x in steps],
    }


async def _capacities(targets: dict[str, tuple[int, int, list[str]]], rounds: int = 2) -> dict[str, dict[str, Any]]:
    """Each target's capacity, in alternating rounds (best of each): the second round starts
    below the first's capacity, so it spends its steps where they decide."""
    best: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for name, (port, pid, paths) in targets.items():
            start_rps = 1000.0 if name not in best else max(1000.0, 0.7 * best[name]["capacity_rps"])
            got = await _ramp(port, pid, _requests(paths), start_rps)
            got["round"] = r + 1
            if name not in best or got["capacity_rps"] > best[name]["capacity_rps"]:
                best[name] = got
    return best


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


def main(argv: list[str]) -> int:
    """`python -m devkit.bench_api hello PORT`: the trivial endpoint, served as `tallyflow api`
    serves its app (the environment's settings)."""
    from serving.server import serve

    if argv[:1] != ["hello"] or len(argv) != 2:
        print("usage: python -m devkit.bench_api hello PORT", file=sys.stderr)
        return 2
    return serve(load_settings(), "127.0.0.1", int(argv[1]), app="devkit.bench_api:hello_app")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
