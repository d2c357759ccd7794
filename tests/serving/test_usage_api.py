"""Usage and entitlement queries over real HTTP, answered from the read model a real rating
process keeps in the real Redis: scopes, each status, the hard limit closing access and a
new period opening it again, and the usage page rendered by a real headless Chromium."""

from __future__ import annotations

import copy
import subprocess
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import html as lxml_html

from devkit.pipeline import wait_until
from operators.periods import period_of
from runtime.settings import Settings
from tests.serving.conftest import INGEST, READER, SLOW
from tests.support.events import CATALOG, ev
from tests.support.flows import produce_events, run_bounded, start_rating, write_catalog

NOW = datetime.now(UTC)
CURRENT = period_of(int(NOW.timestamp() * 1000), "month")
PREVIOUS = period_of(CURRENT.start_ms - 1, "month")
IN_PREVIOUS = datetime.fromtimestamp(PREVIOUS.start_ms / 1000, UTC) + timedelta(days=2)


def this_month(ago: timedelta) -> datetime:
    """`ago` before now, but never before this month began."""
    return max(NOW - ago, datetime.fromtimestamp(CURRENT.start_ms / 1000, UTC))


def read(token: str = READER) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hard_limited(s: Settings) -> Settings:
    """acme's plan (basic: 10 calls included) closes access at 12 calls."""
    cat: dict[str, Any] = copy.deepcopy(CATALOG)
    cat["plans"][0]["meters"]["calls"]["hard_limit"] = {"absolute": 12}
    write_catalog(Path(s.process.catalog), cat)
    return s


def calls(n: int, at: datetime, prefix: str) -> list[bytes]:
    return [ev("acme", at=at + timedelta(milliseconds=i), id=f"{prefix}{i}") for i in range(n)]


def test_has_access_closes_at_the_hard_limit_and_opens_again_in_a_new_period(
    api: Callable[..., httpx.Client], small: Settings, tmp_path: Path
) -> None:
    s = hard_limited(small)
    c = api()
    rating = start_rating(s, tmp_path / "rating.log", TALLYFLOW_IDLE_TIMEOUT_SECONDS="1")
    try:

        def entitlement(period: str | None = None) -> dict[str, Any]:
            r = c.get("/v1/tenants/acme/entitlements/calls", params={"period": period} if period else None, headers=read())
            assert r.status_code == 200, r.text
            return dict(r.json())

        def used(n: int, period: str | None = None) -> Callable[[], dict[str, Any] | None]:
            return lambda: e if Decimal((e := entitlement(period))["used"]) == n else None

        # Last month: 12 calls reach the hard limit.
        produce_events(s, calls(12, IN_PREVIOUS, "prev-"))
        last = wait_until(used(12, PREVIOUS.key), 60, "last month's 12 calls in the read model")
        assert (last["has_access"], last["included"], last["remaining"], last["overage"], last["hard_limit"]) == (
            False,
            "10",
            "0",
            "2",
            "12",
        )
        assert last["period"] == PREVIOUS.key and last["pricing_version"] == "basic:v1"
        # This month nothing is used yet: access is open, everything included remains.
        now = entitlement()
        assert (now["period"], now["has_access"], now["used"], now["remaining"], now["watermark"]) == (CURRENT.key, True, "0", "10", None)
        # 11 calls: past included (billed as overage), access still open; the 12th closes it.
        produce_events(s, calls(11, this_month(timedelta(seconds=30)), "now-"))
        now = wait_until(used(11), 30, "this month's 11 calls")
        assert (now["has_access"], now["overage"], now["remaining"]) == (True, "1", "0")
        produce_events(s, calls(1, this_month(timedelta(seconds=10)), "last-"))
        assert wait_until(used(12), 30, "the 12th call")["has_access"] is False
        # Last month stays as it was (final past its grace; its last write came from the engine forgetting it).
        assert entitlement(PREVIOUS.key)["has_access"] is False

        # The usage document: both periods, one meter on request, levels with their times.
        usage = c.get("/v1/tenants/acme/usage", params={"period": CURRENT.key}, headers=read()).json()
        m = usage["meters"]["calls"]
        assert (usage["tenant_id"], usage["period"], m["quantity"], m["used"], m["amount"], m["has_access"]) == (
            "acme",
            CURRENT.key,
            "12",
            "12",
            "0.20",
            False,
        )
        assert [lv["level"] for lv in m["levels"]] == ["80%", "100%", "expansion", "120%"]
        assert all(lv["crossed_at"].startswith(NOW.strftime("%Y-%m")) for lv in m["levels"])
        one = c.get("/v1/tenants/acme/usage", params={"period": PREVIOUS.key, "meter": "calls"}, headers=read()).json()
        assert list(one["meters"]) == ["calls"] and one["meters"]["calls"]["quantity"] == "12"
        # Once the windows close (idle), what is rated catches up with the amount to date.
        wait_until(
            lambda: c.get("/v1/tenants/acme/usage", headers=read()).json()["meters"]["calls"]["amount_rated"] == "0.20",
            30,
            "this month's windows to close and be rated",
        )
    finally:
        rating.terminate()
        rating.wait(30)


def test_queries_need_the_read_scope_and_say_what_is_missing(api: Callable[..., httpx.Client]) -> None:
    c = api()
    assert c.get("/v1/tenants/acme/usage").status_code == 401
    assert c.get("/v1/tenants/acme/usage", headers=read("not-a-token-at-all")).status_code == 401
    assert c.get("/v1/tenants/acme/entitlements/calls", headers=read(SLOW)).status_code == 403
    assert c.get("/v1/tenants/acme/entitlements/calls", headers=read(INGEST)).status_code == 200  # ingest and read
    r = c.get("/v1/tenants/ghost/usage", headers=read())
    assert r.status_code == 404 and "no tenant 'ghost'" in r.json()["error"]
    r = c.get("/v1/tenants/acme/entitlements/nope", headers=read())
    assert r.status_code == 404 and "meter 'nope' is not in plan basic:v1" in r.json()["error"]
    r = c.get("/v1/tenants/acme/usage", params={"period": "2026-13"}, headers=read())
    assert r.status_code == 400 and "use YYYY-MM" in r.json()["error"]
    # A period without usage: every meter of the plan at zero, with what is included.
    empty = c.get("/v1/tenants/acme/usage", params={"period": "2020-01"}, headers=read()).json()
    assert (empty["events"], empty["watermark"], empty["meters"]["calls"]["included"], empty["meters"]["calls"]["used"]) == (
        0,
        None,
        "10",
        "0",
    )
    # The page asks a browser for the token; the same token as a Basic password opens it.
    page = c.get("/tenants/acme")
    assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert c.get("/tenants/acme", auth=("anyone", READER)).status_code == 200


@pytest.mark.integration
def test_the_usage_page_in_headless_chromium_shows_the_tenants_figures(api: Callable[..., httpx.Client], small: Settings) -> None:
    s = hard_limited(small)
    at = this_month(timedelta(minutes=5))
    events = [*calls(12, at, "p-"), ev("acme", "llm.tokens", at=at, data={"tokens": 600}, id="tok-1")]
    run_bounded(s, produce_events(s, events))
    c = api()
    url = f"http://reader:{READER}@{c.base_url.host}:{c.base_url.port}/tenants/acme"
    dom = lxml_html.fromstring(_chromium_dom(url))
    assert dom.findtext(".//title") == f"Usage of acme · {CURRENT.key} · Tallyflow"
    assert dom.get_element_by_id("tenant").text == "acme" and dom.get_element_by_id("period").text == CURRENT.key
    calls_box = dom.get_element_by_id("meter-calls")
    figures = {b.get("class"): b.text for b in calls_box.iter("b") if b.get("class")}
    assert (figures["used"], figures["included"], figures["remaining"], figures["overage"]) == ("12", "10", "0", "2")
    assert "access closed" in calls_box.text_content() and "USD 0.20" in calls_box.text_content()
    tokens_box = dom.get_element_by_id("meter-tokens")
    assert "USD 1.50" in tokens_box.text_content()  # 500 over the 100 included, at 0.003
    assert dom.get_element_by_id("total").text == "USD 1.70"
    assert len(calls_box.find_class("tick")) == 5  # four levels and the hard limit
    rows = [[td.text for td in tr.iter("td")] for tr in dom.iter("tr")][1:]
    assert [r[1:3] for r in rows] == [["calls", "120%"], ["calls", "100%"], ["calls", "expansion"], ["calls", "80%"], ["tokens", "big"]]


def _chromium_dom(url: str) -> str:
    """The page as a real browser rendered it (Debian's chromium, headless; the flags keep
    it off the network beyond loopback)."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return out.stdout.decode()
