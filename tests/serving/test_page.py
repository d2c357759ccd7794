"""The usage page for a customer-success reader (issue 23 item 4), from a synthetic
`TenantUsage` derived by the read model's own code: the bar scaled to what is included or
used, thresholds beyond it pinned at its edge, money with its minor unit and what of it is
rated, times in the viewer's UTC offset, matrix cells, spend alerts and the daily chart (SVG,
no script); then the page as headless Chromium renders it under the API's headers, with a
screenshot kept and measured."""

from __future__ import annotations

import http.server
import re
import struct
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from lxml import html as lxml_html

from operators.catalog_index import CatalogIndex
from operators.usage import derive
from schemas.catalog import parse_catalog
from schemas.usage import CellFacts, LevelCrossed, LevelFacts, MeterFacts, TenantUsage, UsageFacts, VersionFacts
from serving.page import render, zone

CATALOG: dict[str, Any] = {
    "meters": [
        {"slug": "api_calls", "event_type": "api.request", "aggregation": "COUNT"},
        {"slug": "seats", "event_type": "seats.updated", "aggregation": "LATEST", "value_path": "seats"},
        {"slug": "llm_tokens", "event_type": "llm.completion", "aggregation": "SUM", "value_path": "tokens", "dimensions": ["model"]},
    ],
    "plans": [
        {
            "id": "pro",
            "version": 1,
            "currency": "USD",
            "spend_thresholds": [{"amount": "100.00"}, {"amount": "1000.00"}],
            "meters": {
                "api_calls": {
                    "product_code": "API",
                    "included": 1000,
                    "price": {"model": "per_unit", "unit_price": "0.01"},
                    "thresholds": [{"fraction": "0.8"}, {"fraction": "1.0"}, {"absolute": 5000, "name": "big"}],
                    "hard_limit": {"absolute": 20000},
                },
                "seats": {"product_code": "SEAT", "price": {"model": "per_unit", "unit_price": "12.00"}},
                "llm_tokens": {
                    "product_code": "LLM",
                    "price": {
                        "model": "matrix",
                        "cells": [{"when": {"model": "large"}, "unit_price": "0.00006"}],
                        "default_unit_price": "0.00003",
                    },
                },
            },
        },
        {
            "id": "yen",
            "version": 1,
            "currency": "JPY",
            "meters": {"seats": {"product_code": "SEAT-JP", "price": {"model": "per_unit", "unit_price": "500"}}},
        },
        {
            "id": "daily",
            "version": 1,
            "currency": "USD",
            "billing_period": "day",
            "meters": {"api_calls": {"product_code": "API-D", "included": 10, "price": {"model": "per_unit", "unit_price": "0.01"}}},
        },
    ],
    "tenants": [
        {"tenant_id": "acme", "plan": "pro", "crm_account_id": "CRM-1", "erp_customer_id": "ERP-1", "contract_id": "C-1"},
        {"tenant_id": "kobe", "plan": "yen", "crm_account_id": "CRM-2", "erp_customer_id": "ERP-2", "contract_id": "C-2"},
        {"tenant_id": "dayco", "plan": "daily", "crm_account_id": "CRM-3", "erp_customer_id": "ERP-3", "contract_id": "C-3"},
    ],
}
CAT = CatalogIndex.build(parse_catalog(CATALOG))
WATERMARK = "2026-11-20T16:37:00+00:00"


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def usage(calls: int = 900, seats_rated: int = 0) -> TenantUsage:
    """acme's November as the API would answer it (derived by operators/usage.py from facts)."""
    facts = UsageFacts(
        "acme",
        "2026-11",
        "month",
        ms("2026-11-01T00:00:00+00:00"),
        ms("2026-12-01T00:00:00+00:00"),
        ms(WATERMARK),
        ms("2026-11-20T16:37:10+00:00"),
        calls + 3 + 300,
        [
            MeterFacts(
                "api_calls",
                ms(WATERMARK),
                [VersionFacts("pro:v1", D(calls), D(calls), calls)],
                [LevelFacts("pro:v1", "80%", ms("2026-11-15T09:05:00+00:00"))],
            ),
            MeterFacts("seats", ms("2026-11-20T16:30:00+00:00"), [VersionFacts("pro:v1", D(10), D(seats_rated), 3)], []),
            MeterFacts(
                "llm_tokens",
                ms("2026-11-20T16:36:00+00:00"),
                [VersionFacts("pro:v1", D(1_500_000), D(1_400_000), 300)],
                [],
                [
                    CellFacts(["small"], "pro:v1", D(500_000), D(500_000), 100),
                    CellFacts(["large"], "pro:v1", D(1_000_000), D(900_000), 200),
                ],
            ),
        ],
    )
    return derive(CAT, facts)


def with_spend(doc: TenantUsage) -> TenantUsage:
    """The spend level as the read model would carry it once it does: a level named `spend:<amount>`."""
    doc.meters["api_calls"].levels.append(
        LevelCrossed(level="spend:100.00", limit=D("100.00"), pricing_version="pro:v1", crossed_at="2026-11-18T11:00:00.000Z")
    )
    return doc


DAILY = {"api_calls": [(f"2026-11-{d:02d}", D(d * 3)) for d in range(1, 21) if d != 7]}  # nothing on the 7th


def page(doc: TenantUsage | None = None, **kw: Any) -> Any:
    return lxml_html.fromstring(render(doc or usage(), CAT, ["2026-11", "2026-10"], **kw))


def style(el: Any) -> dict[str, str]:
    return dict(p.split(":", 1) for p in el.get("style").split(";") if p)


def text(el: Any) -> str:
    return " ".join(el.text_content().split())


# -- the bar ---------------------------------------------------------------------------------


def test_the_bar_is_scaled_to_included_so_900_of_1000_fills_nine_tenths():
    """Issue 23: an absolute 5,000 threshold set the scale and 900 of 1,000 was a 15 % sliver."""
    box = page().get_element_by_id("meter-api_calls")
    assert style(box.find_class("in")[0])["width"] == "90.00%"
    assert style(box.find_class("over")[0])["width"] == "0.00%"
    ticks = {t.get("title").split(":")[0]: t for t in box.find_class("tick")}
    assert set(ticks) == {"80%", "100%", "big", "hard limit"}
    assert style(ticks["80%"])["left"] == "calc(80.00% - 2px)" and style(ticks["100%"])["left"] == "calc(100.00% - 2px)"
    # Beyond the bar: pinned at its right edge (nearest first), dashed, and named under it.
    assert "far" in ticks["big"].get("class") and style(ticks["big"])["right"] == "0px"
    assert "far" in ticks["hard limit"].get("class") and style(ticks["hard limit"])["right"] == "6px"
    assert text(box.find_class("beyond")[0]) == "Beyond the bar (marked at its right edge): big at 5,000 · hard limit at 20,000"
    assert text(box.find_class("end")[0]) == "1,000 included"


def test_past_included_the_bar_is_scaled_to_what_is_used():
    box = page(usage(calls=1250)).get_element_by_id("meter-api_calls")
    assert style(box.find_class("in")[0])["width"] == "80.00%"
    assert style(box.find_class("over")[0]) == {"left": "80.00%", "width": "20.00%"}
    assert text(box.find_class("end")[0]) == "1,250 used"
    assert [t.get("title").split(":")[0] for t in box.find_class("far")] == ["big", "hard limit"]


def test_a_meter_with_nothing_included_says_all_of_it_is_billed():
    box = page().get_element_by_id("meter-seats")
    assert text(box.find_class("end")[0]) == "10 used (nothing included: all of it is billed)"


# -- money -----------------------------------------------------------------------------------


def test_money_has_its_minor_unit_and_says_what_is_rated_and_what_is_not_yet():
    """Issue 23: seats showed "USD 120" beside "rated so far USD 0" without a word."""
    dom = page()
    seats = dom.get_element_by_id("meter-seats")
    assert seats.find_class("amount")[0].text == "USD 120.00"
    line = text(seats.find_class("money")[0])
    assert line.startswith("Amount to date USD 120.00: rated so far USD 0.00 (on rated lines, on their way to the invoice);")
    assert "USD 120.00 not rated yet (recent usage whose time window is still open" in line
    assert dom.get_element_by_id("total").text == "USD 195.00"  # 0.00 + 75.00 + 120.00
    rated = page(usage(seats_rated=10)).get_element_by_id("meter-seats").find_class("money")[0]
    assert text(rated) == "Amount to date USD 120.00, all of it rated (USD 120.00 on rated lines, on their way to the invoice)."
    calls = text(dom.get_element_by_id("meter-api_calls").find_class("money")[0])
    assert calls == "Amount to date USD 0.00: within what the plan includes so far."


def test_money_keeps_each_currencys_minor_unit():
    kobe = derive(
        CAT,
        UsageFacts(
            "kobe", "2026-11", "month", ms("2026-11-01T00:00:00+00:00"), ms("2026-12-01T00:00:00+00:00"), ms(WATERMARK), ms(WATERMARK), 3,
            [MeterFacts("seats", ms(WATERMARK), [VersionFacts("yen:v1", D(3), D(3), 3)], [])],
        ),
    )  # fmt: skip
    dom = lxml_html.fromstring(render(kobe, CAT, ["2026-11"]))
    assert dom.get_element_by_id("total").text == "JPY 1,500"  # the yen has no minor unit
    from serving.page import _money

    assert (_money("USD", D(120)), _money("USD", D("0.005")), _money("BHD", D("1.5")), _money("EUR", D("-3.1"))) == (
        "USD 120.00",
        "USD 0.005",  # finer than the minor unit: shown as it is, never rounded for show
        "BHD 1.500",
        "EUR -3.10",
    )


# -- times -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tz, label, last_event",
    [
        (None, "UTC", "20 Nov 16:37 UTC"),
        ("+01:00", "UTC+01:00", "20 Nov 17:37 UTC+01:00"),
        (" 01:00", "UTC+01:00", "20 Nov 17:37 UTC+01:00"),  # `?tz=+01:00` typed unescaped: the + arrives as a space
        ("-05:30", "UTC-05:30", "20 Nov 11:07 UTC-05:30"),
        ("+0530", "UTC+05:30", "20 Nov 22:07 UTC+05:30"),
        ("UTC+9", "UTC+09:00", "21 Nov 01:37 UTC+09:00"),
        ("Z", "UTC", "20 Nov 16:37 UTC"),
    ],
)
def test_times_are_for_people_in_the_viewers_offset_and_labelled(tz, label, last_event):
    dom = page(tz=tz)
    assert dom.get_element_by_id("tz").text == label
    box = dom.get_element_by_id("meter-api_calls")
    when = next(t for t in box.iter("time"))
    assert (when.text, when.get("datetime")) == (last_event, "2026-11-20T16:37:00.000Z")  # the exact time stays in the element
    assert not re.search(r"\d{4}-\d\d-\d\dT\d", text(dom.find("body")))  # no RFC 3339 left for people to read
    links = [a.get("href") for a in dom.find(".//nav").iter("a")]
    param = zone(tz).param
    tail = "" if param is None else "&tz=" + param.replace("+", "%2B").replace(":", "%3A")
    assert links == [f"?period=2026-11{tail}", f"?period=2026-10{tail}"]


def test_an_offset_that_cannot_be_read_is_said_and_times_stay_utc():
    for bad in ("banana", "+25:00", "+01:75"):
        dom = page(tz=bad)
        assert dom.get_element_by_id("tz").text == "UTC"
        assert f"'{bad}' is not a UTC offset" in text(dom.find_class("tz")[0])
        assert next(dom.get_element_by_id("meter-api_calls").iter("time")).text == "20 Nov 16:37 UTC"


# -- cells, spend, thresholds ----------------------------------------------------------------


def test_a_matrix_meter_shows_its_cells_largest_amount_first():
    table = page().get_element_by_id("cells-llm_tokens")
    rows = [[td.text_content() for td in tr.iter("td", "th")] for tr in table.iter("tr")]
    assert rows == [["model", "quantity", "amount"], ["large", "1,000,000", "USD 60.00"], ["small", "500,000", "USD 15.00"]]
    assert not page().get_element_by_id("meter-seats").find_class("cells")


def test_spend_alerts_are_shown_with_what_is_left_to_go():
    dom = page(with_spend(usage()))
    spend = {li.get("data-level"): text(li) for li in dom.get_element_by_id("spend").iter("li")}
    assert spend == {"spend:100.00": "USD 100.00: crossed 18 Nov 11:00 UTC", "spend:1000.00": "USD 1,000.00: USD 805.00 to go"}
    crossed = [[text(td) for td in tr.iter("td")] for tr in dom.get_element_by_id("crossed").iter("tr")][1:]
    assert crossed == [
        ["18 Nov 11:00 UTC", "all meters (spend)", "spend:100.00", "USD 100.00", "pro:v1"],
        ["15 Nov 09:05 UTC", "api_calls", "80%", "800", "pro:v1"],
    ]
    # Without a crossed level the plan's thresholds are still listed, each with what is left.
    assert next(text(li) for li in page().get_element_by_id("spend").iter("li")) == "USD 100.00: reached by the amount to date"


def test_every_value_from_the_read_model_is_escaped():
    doc = usage()
    doc.meters["llm_tokens"].cells[0].dimensions["model"] = "<script>alert(1)</script>"
    html = render(doc, CAT, ["2026-11"], tz="<b>")
    assert "<script>" not in html and "&lt;script&gt;" in html and "&#x27;&lt;b&gt;&#x27; is not a UTC offset" in html


# -- the daily chart -------------------------------------------------------------------------


def test_the_daily_chart_is_an_svg_bar_per_day_up_to_the_watermark():
    dom = page(daily=DAILY)
    fig = dom.get_element_by_id("daily-api_calls")
    svg = next(fig.iter("svg"))
    assert svg.get("role") == "img" and svg.get("aria-label") == "api_calls per day, Nov 2026; peak 60 on 20 Nov"
    bars = {r.get("data-day"): r for r in svg.iter("rect")}
    assert list(bars) == [f"2026-11-{d:02d}" for d in range(1, 21)]  # up to the watermark's day, none after
    heights = {d: float(r.get("height")) for d, r in bars.items()}
    assert heights["2026-11-20"] == 150 - 12 - 22  # the peak fills the plot
    assert heights["2026-11-07"] == 0 and bars["2026-11-07"].get("data-quantity") == "0"  # a day without usage is zero
    assert heights["2026-11-10"] == pytest.approx(heights["2026-11-20"] / 2, abs=0.01)
    assert bars["2026-11-10"].findtext("title") == "10 Nov: 30"
    assert [t.text for t in svg.iter("text")] == ["60", "0", "1", "5", "10", "15", "20", "25", "30"]
    assert "Usage per day (events that day), days in UTC." in text(fig)
    assert not dom.findall(".//script") and "<script" not in render(usage(), CAT, [], daily=DAILY)


def test_without_a_daily_series_the_page_says_so():
    dom = page()  # TenantUsage carries no series yet
    for slug in ("api_calls", "seats", "llm_tokens"):
        el = dom.get_element_by_id(f"daily-{slug}")
        assert el.tag == "p" and text(el) == "Daily usage: no daily series yet."
    assert not dom.findall(".//svg")


def test_a_one_day_billing_period_has_no_daily_chart():
    doc = derive(
        CAT,
        UsageFacts(
            "dayco", "2026-11-20", "day", ms("2026-11-20T00:00:00+00:00"), ms("2026-11-21T00:00:00+00:00"), ms(WATERMARK), ms(WATERMARK), 4,
            [MeterFacts("api_calls", ms(WATERMARK), [VersionFacts("daily:v1", D(4), D(4), 4)], [])],
        ),
    )  # fmt: skip
    dom = lxml_html.fromstring(render(doc, CAT, ["2026-11-20"], daily={"api_calls": [("2026-11-20", D(4))]}))
    assert text(dom.get_element_by_id("daily-api_calls")) == "Daily usage: this billing period is one day."


# -- in a real browser -----------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[Callable[[str, str], str]]:
    """Pages served on loopback with the headers the API gives every HTML answer (CSP etc.)."""
    from serving.app import HTML_HEADERS

    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            for k, v in HTML_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(path: str, html: str) -> str:
        pages[path] = html.encode()
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield serve
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_the_page_in_headless_chromium_under_the_apis_headers(served, tmp_path: Path) -> None:
    url = served("/tenants/acme", render(with_spend(usage()), CAT, ["2026-11", "2026-10"], tz="+01:00", daily=DAILY))
    dom_html, log = chromium(url, "--dump-dom")
    assert "Content Security Policy" not in log, log[-3000:]  # nothing on the page is blocked by the API's CSP
    dom = lxml_html.fromstring(dom_html)
    assert len(list(dom.get_element_by_id("daily-api_calls").iter("rect"))) == 20
    assert dom.get_element_by_id("tz").text == "UTC+01:00"

    shot = tmp_path / "usage-page.png"
    _, log = chromium(url, f"--screenshot={shot}", "--window-size=1000,2000", "--hide-scrollbars")
    print(f"\nscreenshot of the usage page: {shot}")
    assert "Content Security Policy" not in log, log[-3000:]
    width, _, px = read_png(shot.read_bytes())
    blue = (0x3B, 0x82, 0xC4)

    def runs(row: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        out, start = [], None
        for x, p in enumerate([*row, (255, 255, 255)]):
            if near(p, blue) and start is None:
                start = x
            elif not near(p, blue) and start is not None:
                out.append((start, x))
                start = None
        return out

    # The api_calls bar: the first row with blue across most of the card. It spans from its
    # first blue pixel to where the grey track ends; the blue reaches 90 % of it (80 % tick aside).
    ys = [y for y, row in enumerate(px) if sum(b - a for a, b in runs(row)) > width * 0.5]
    y = ys[0] + 8  # its middle (22 px high), clear of the rounded corners
    assert ys[:22] == list(range(ys[0], ys[0] + 22)), ys[:30]
    row = px[y]
    x0 = runs(row)[0][0]
    end = next(x for x in range(x0, width) if row[x] == (255, 255, 255))
    last_blue = max(b for _, b in runs(row))
    assert (last_blue - x0) / (end - x0) == pytest.approx(0.90, abs=0.01), (x0, last_blue, end)
    # The chart below it: in some row, 19 separate blue bars (20 days, the 7th empty).
    assert any(len([r for r in runs(px[yy]) if r[1] - r[0] < 40]) == 19 for yy in range(y + 40, len(px)))


def near(p: tuple[int, int, int], q: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 6 for a, b in zip(p, q, strict=True))


def chromium(url: str, *args: str) -> tuple[str, str]:
    """Debian's chromium, headless, off the network beyond loopback; (stdout, its log)."""
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
                "--enable-logging=stderr",
                "--v=0",
                f"--user-data-dir={profile}",
                *args,
                url,
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return out.stdout.decode(), out.stderr.decode(errors="replace")


def read_png(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """(width, height, RGB rows) of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[list[tuple[int, int, int]]] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([(line[i], line[i + 1], line[i + 2]) for i in range(0, stride, bpp)])
        prev = line
    return width, height, rows
