"""The API under what a public endpoint meets (issue 18, item 6): Redis stopped, hostile
batches, slow and oversized clients, a large keyspace, pages in frames. Each answers with a
status and a body a client can act on, and holds nothing for long."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import jsonschema
import orjson
import redis
from lxml import html as lxml_html

from devkit.pipeline import wait_until
from operators.catalog_index import CatalogIndex
from operators.periods import period_of
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.catalog import parse_catalog
from schemas.usage import UsageFacts
from serving.app import BATCH
from serving.server import Bounds
from serving.usage import Queries
from state.read_model import ReadModelWriter
from tests.serving.conftest import INGEST, READER, bearer
from tests.support.events import CATALOG, ev
from tests.support.flows import OwnRedis

NOW_MS = int(time.time() * 1000)
CURRENT = period_of(NOW_MS, "month")
PREVIOUS = period_of(CURRENT.start_ms - 1, "month")
EARLIER = period_of(PREVIOUS.start_ms - 1, "month")
READ = {"Authorization": f"Bearer {READER}"}
CONTENT_SECURITY = {"frame-ancestors 'none'", "default-src 'none'", "base-uri 'none'", "form-action 'none'"}


def on(r: OwnRedis) -> dict[str, Any]:
    return {"redis_url": f"redis://127.0.0.1:{r.port}"}


def test_redis_stopped_is_503_json_with_retry_after_and_readyz_names_it(api: Callable[..., httpx.Client], own_redis: OwnRedis) -> None:
    c = api(**on(own_redis))
    reads = ["/v1/tenants/acme/usage", "/v1/tenants/acme/entitlements/calls", "/tenants/acme"]
    assert [c.get(p, headers=READ).status_code for p in reads] == [200, 200, 200]
    assert c.get("/readyz").status_code == 200
    own_redis.stop()
    for path in reads:
        started = time.monotonic()
        r = c.get(path, headers=READ)
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", (path, r.status_code, r.text)
        assert "ask again" in r.json()["error"] and int(r.headers["Retry-After"]) > 0
        assert time.monotonic() - started < 5  # answered, not held by the client's retries
    # Ready no more (within the check's cache); each probe answers within the probe's 3 s.
    ready = wait_until(lambda: (r := c.get("/readyz", timeout=3)).status_code == 503 and r, 15, "/readyz to see Redis gone")
    assert any("Redis at redis://127.0.0.1" in p for p in ready.json()["problems"]), ready.json()
    own_redis.start()  # the same port: the API's pooled connections are stale, the next call reconnects
    wait_until(lambda: c.get("/readyz", timeout=3).status_code == 200, 15, "/readyz to see Redis back")
    assert [c.get(p, headers=READ).status_code for p in reads] == [200, 200, 200]


def test_an_event_nested_beyond_the_limit_is_refused_alone_at_its_index(api: Callable[..., httpx.Client], small: Settings) -> None:
    c = api()
    good = [ev("acme", id=f"n{i}") for i in range(2)]
    deep = b'{"specversion":"1.0","data":' + b"[" * 5000 + b"]" * 5000 + b"}"  # past any recursion limit
    r = c.post("/v1/events", content=b"[" + b",".join([good[0], deep, good[1]]) + b"]", headers=bearer(INGEST, BATCH))
    assert r.status_code == 400, r.text
    doc = r.json()
    assert (doc["accepted_indexes"], doc["refused_count"]) == ([0, 2], 1)
    assert doc["refused"][0]["index"] == 1 and doc["refused"][0]["reason"] == "too_deep"
    assert "nested 5001 deep; the limit is 32" in doc["refused"][0]["message"]
    assert sorted(read_topic(small.kafka.brokers, small.topics.input)) == sorted(good)
    one = c.post("/v1/events", content=b"[" * 3000 + b"]" * 3000, headers=bearer(INGEST))  # posted as one event
    assert one.status_code == 400 and one.json()["refused"][0]["reason"] == "too_deep"


def test_a_400_lists_the_first_100_refusals_and_counts_them_all(api: Callable[..., httpx.Client]) -> None:
    c = api()
    r = c.post("/v1/events", content=b"[" + b",".join([b"{}"] * 20_000) + b"]", headers=bearer(INGEST, BATCH))
    assert r.status_code == 400 and len(r.content) < 20_000, len(r.content)  # was 1.7 MB, growing with the batch
    doc = orjson.loads(r.content)
    assert (doc["accepted"], doc["accepted_indexes"], doc["refused_count"]) == (0, [], 20_000)
    assert [x["index"] for x in doc["refused"]] == list(range(100))
    spec = orjson.loads(c.get("/openapi.json").content)
    jsonschema.validate(doc, {"$ref": "#/components/schemas/IngestAnswer", "components": spec["components"]})


def test_every_html_answer_forbids_framing_scripts_and_sniffing(api: Callable[..., httpx.Client]) -> None:
    c = api()
    answers = {
        200: c.get("/tenants/acme", auth=("me", READER)),
        401: c.get("/tenants/acme"),
        403: c.get("/tenants/acme", auth=("me", "slow-token-0123456789")),  # no read scope
        404: c.get("/tenants/ghost", auth=("me", READER)),
        400: c.get("/tenants/acme", params={"period": "2026-13"}, auth=("me", READER)),
    }
    for status, r in answers.items():
        assert r.status_code == status and r.headers["content-type"].startswith("text/html"), (status, r.status_code)
        csp = {d.strip() for d in r.headers["content-security-policy"].split(";")}
        assert csp >= CONTENT_SECURITY, (status, csp)
        assert (r.headers["x-content-type-options"], r.headers["x-frame-options"]) == ("nosniff", "DENY")


def facts(tenant: str, period_ms: int) -> UsageFacts:
    p = period_of(period_ms, "month")
    return UsageFacts(tenant, p.key, "month", p.start_ms, p.end_ms, p.start_ms, p.start_ms, 1, [])


def test_the_page_links_exactly_its_tenants_periods_without_a_scan(
    api: Callable[..., httpx.Client], small: Settings, own_redis: OwnRedis
) -> None:
    c = api(**on(own_redis))
    # acme has usage last month and the month before; `acme:b` (any tenant whose id extends
    # acme's at a separator) and `acmeco` have theirs, which acme's page must not link.
    ReadModelWriter(small.replace(**on(own_redis)).stores).write(
        [facts("acme", PREVIOUS.start_ms), facts("acme", EARLIER.start_ms), facts("acme:b", CURRENT.start_ms - 1), facts("acmeco", 0)]
    )
    r = redis.Redis(port=own_redis.port)
    scans = r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    page = c.get("/tenants/acme", auth=("me", READER))
    assert page.status_code == 200
    links = [a.get("href") for a in lxml_html.fromstring(page.text).iter("a")]
    assert links == [f"?period={p.key}" for p in (CURRENT, PREVIOUS, EARLIER)]  # the shown period, then those with usage
    assert r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans  # named keys only (one EXISTS each)


def test_page_periods_come_from_the_catalog_bounded_by_the_contract_and_the_plans_periods() -> None:
    cat: dict[str, Any] = {**CATALOG, "plans": [*CATALOG["plans"], {**CATALOG["plans"][1], "id": "daily", "billing_period": "day"}]}
    cat["tenants"] = [
        *CATALOG["tenants"],
        {**CATALOG["tenants"][0], "tenant_id": "dayco", "plan_changes": [{"plan": "daily", "effective_from": "2026-05-13T00:00:00Z"}]},
    ]
    q = Queries(SimpleNamespace(index=CatalogIndex.build(parse_catalog(cat))), None)  # type: ignore[arg-type]
    at = int(datetime(2026, 5, 15, 9, tzinfo=UTC).timestamp() * 1000)
    assert q.recent_periods("late-co", at) == ["2026-05", "2026-04", "2026-03"]  # its contract began in March
    assert q.recent_periods("acme", at, 3) == ["2026-05", "2026-04", "2026-03"]
    # Daily since the 13th: those days, then the month's monthly part, then months.
    assert q.recent_periods("dayco", at, 6) == ["2026-05-15", "2026-05-14", "2026-05-13", "2026-05", "2026-04", "2026-03"]


def test_slow_clients_are_cut_off_and_cannot_hold_the_server(api: Callable[..., httpx.Client]) -> None:
    c = api(bounds=Bounds(concurrency=40, keep_alive_seconds=1, header_seconds=3.0, header_bytes=8192, body_seconds=1.0))
    host, port = c.base_url.host, c.base_url.port
    assert port is not None

    def slow() -> socket.socket:
        s = socket.create_connection((host, port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Trickle: a")  # headers never finished
        return s

    def closed(s: socket.socket, within: float) -> bytes:
        """What the server sent before closing `s` (fails if it is still open at the deadline)."""
        s.settimeout(within)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        return got

    # 30 connections stuck in their headers: a normal request is still answered, before they are cut.
    started = time.monotonic()
    held = [slow() for _ in range(30)]
    assert c.get("/healthz").status_code == 200 and time.monotonic() - started < 3
    # Past the concurrency limit a request is refused at once (503), not queued behind them.
    held += [slow() for _ in range(15)]
    with httpx.Client(base_url=c.base_url, timeout=5) as fresh:
        assert fresh.get("/healthz").status_code == 503
    # The header deadline (3 s) closes every slow connection, and normal service is back.
    for s in held:
        assert closed(s, 10) == b""
        s.close()
    wait_until(lambda: c.get("/healthz").status_code == 200, 10, "the API to serve again")
    # An idle kept-alive connection is closed after keep_alive_seconds.
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed(s, 5).startswith(b"HTTP/1.1 200")
    # Too many header bytes: 431, then closed.
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        assert closed(s, 5).startswith(b"HTTP/1.1 431")
    # A body that stops coming: 408 after body_seconds.
    with socket.create_connection((host, port)) as s:
        s.sendall(
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INGEST}\r\n"
            "Content-Type: application/cloudevents+json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        assert closed(s, 5).startswith(b"HTTP/1.1 408")


def test_the_page_over_http_shows_times_in_the_viewers_offset(api: Callable[..., httpx.Client]) -> None:
    """`?tz=` reaches the page (it was read by the renderer but not passed by the route)."""
    c = api()
    utc = c.get("/tenants/acme", auth=("me", READER))
    plus = c.get("/tenants/acme", params={"tz": "+01:00"}, auth=("me", READER))
    assert utc.status_code == plus.status_code == 200
    assert 'id="tz">UTC<' in utc.text and 'id="tz">UTC+01:00<' in plus.text
