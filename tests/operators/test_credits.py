"""Prepaid credits drawn down in the stream (SPEC §9.5-9.8), through the engine as the
dataflow drives it: the draw order, returns, expiry, voids, bad grants, the minimum true-up
and credit alerts; per grant, always granted = drawn - returned + expired + voided + remaining."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from operators.credits import Grant
from schemas.events import GRANTED, VOIDED
from tests.support.events import CATALOG, T0, Harness, ev

D = Decimal
S = timedelta(seconds=1)


def grant(grant_id: str, amount: str, *, at: timedelta = timedelta(0), tenant: str = "acme", **data: Any) -> bytes:
    body = {"grant_id": grant_id, "amount": amount, "currency": "USD", "effective_at": "2026-03-01T00:00:00Z", **data}
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"g-{grant_id}-{data.get('priority', '')}",
            "source": "billing",
            "type": GRANTED,
            "subject": tenant,
            "time": (T0 + at).isoformat().replace("+00:00", "Z"),
            "data": body,
        }
    )


def void(grant_id: str, *, at: timedelta = timedelta(0), id: str = "v") -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"{id}-{grant_id}",
            "source": "billing",
            "type": VOIDED,
            "subject": "acme",
            "time": (T0 + at).isoformat().replace("+00:00", "Z"),
            "data": {"grant_id": grant_id},
        }
    )


def calls(n: int, start: timedelta) -> list[bytes]:
    """n api calls (0.10 each past 10 included), one a second from `start`."""
    return [ev("acme", at=start + i * S, id=f"c{start.total_seconds():.0f}-{i}") for i in range(n)]


def balanced(g: Grant) -> bool:
    return g.amount == g.drawn - g.returned + g.expired + g.voided + g.remaining and g.remaining >= 0


def run(*batches: list[bytes], catalog: dict[str, Any] | None = None) -> Harness:
    h = Harness(catalog=catalog)
    for i, b in enumerate(batches):
        h.feed(*b, now=1000.0 + i)
    h.flush()
    return h


def test_a_line_draws_from_its_grants_in_priority_expiry_effective_id_order() -> None:
    h = run(
        [
            grant("late-expiry", "1.00", priority=5, expires_at="2026-06-01T00:00:00Z"),
            grant("no-expiry", "5.00", priority=5),
            grant("soon", "0.30", priority=5, expires_at="2026-04-01T00:00:00Z"),
            grant("low", "9.00", priority=20),
        ],
        calls(10 + 20, timedelta(minutes=1)),  # 20 billable calls: 2.00 in the first window
    )
    drawn = [(c.grant_id, c.amount) for ln in h.lines for c in ln.credits or ()]
    assert drawn == [("soon", D("0.30")), ("late-expiry", D("1.00")), ("no-expiry", D("0.70"))]
    ln = next(ln for ln in h.lines if ln.credits)
    assert ln.net_amount == ln.amount - D("2.00") == D(0)
    grants = h.engine.tenants["acme"].credits.grants  # type: ignore[union-attr]
    assert grants["low"].drawn == 0 and all(balanced(g) for g in grants.values())


def test_a_grant_covers_only_its_currency_meters_and_validity() -> None:
    h = run(
        [
            grant("eur", "5.00", currency="EUR"),
            grant("tokens-only", "5.00", meters=["tokens"]),
            grant("future", "5.00", effective_at="2026-03-11T00:00:00Z"),
            grant("past", "5.00", expires_at="2026-03-05T00:00:00Z"),
        ],
        calls(20, timedelta(minutes=1)),
    )
    assert not [ln for ln in h.lines if ln.credits]


def test_bad_grants_and_voids_are_dead_letters_and_repeats_are_duplicates() -> None:
    h = run(
        [
            grant("a", "1.005"),  # finer than a cent
            grant("b", "-1"),
            grant("c", "1.00", meters=["nope"]),
            grant("d", "1.00", expires_at="2026-02-01T00:00:00Z"),
            grant("ok", "1.00"),
            grant("ok", "2.00", priority=3),  # the same grant_id again (another event id)
            void("ghost"),
            void("ok"),
            void("ok", id="again"),
            orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": "x",
                    "source": "s",
                    "type": GRANTED,
                    "subject": "acme",
                    "time": "2026-03-10T12:00:00Z",
                    "data": {"grant_id": "e"},
                }
            ),  # a grant without its amount and currency
        ]
    )
    reasons = sorted((d.reason, d.message.split(":")[0]) for d in h.dead)
    assert [r for r, _ in reasons] == ["bad_grant"] * 6
    assert any("data.amount" in d.message for d in h.dead) and any("data.meters" in d.message for d in h.dead)
    assert h.stats.duplicates == 2 and h.stats.accepted == 2 and h.stats.conservation_gap() == 0
    ok = h.engine.tenants["acme"].credits.grants["ok"]  # type: ignore[union-attr]
    assert (ok.amount, ok.status, ok.voided, ok.remaining) == (D("1.00"), "voided", D("1.00"), 0)


def test_a_negative_correction_gives_back_newest_draw_first_but_never_refills_a_voided_grant() -> None:
    cat = copy.deepcopy(CATALOG)
    cat["meters"].append({"slug": "gauge", "event_type": "gauge.sampled", "aggregation": "MIN", "value_path": "v"})
    cat["plans"][0]["meters"]["gauge"] = {"product_code": "G", "price": {"model": "per_unit", "unit_price": "1.00"}}
    h = Harness(catalog=cat)
    h.feed(grant("old", "3.00", priority=1), grant("new", "10.00", priority=2))
    h.feed(ev("acme", "gauge.sampled", at=timedelta(minutes=1), data={"v": 8}, id="m1"), now=1001.0)
    h.feed(ev("acme", "gauge.sampled", at=timedelta(minutes=2), data={"v": 9}, id="m2"), now=1002.0)  # closes 12:01
    h.feed(void("new", at=timedelta(minutes=2)), now=1003.0)
    h.feed(ev("acme", "gauge.sampled", at=timedelta(minutes=3), data={"v": 2}, id="m3"), now=1004.0)  # min 8 -> 2
    h.flush()
    g = h.engine.tenants["acme"].credits.grants  # type: ignore[union-attr]
    first = h.lines[0]
    assert [(c.grant_id, c.amount) for c in first.credits or ()] == [("old", D("3.00")), ("new", D("5.00"))]
    back = next(ln for ln in h.lines if ln.amount < 0)
    # -6.00: "new" (the newest draw) was voided, so it is not refilled; "old" gets its 3.00 back.
    assert [(c.grant_id, c.amount) for c in back.credits or ()] == [("old", D("-3.00"))]
    assert back.net_amount == D("-3.00")
    assert (g["new"].voided, g["old"].returned, g["old"].remaining) == (D("5.00"), D("3.00"), D("3.00"))
    assert all(balanced(x) for x in g.values())


def test_what_remains_expires_once_after_the_window_holding_the_expiry_was_rated() -> None:
    h = Harness()
    h.feed(grant("trial", "5.00", expires_at="2026-03-10T12:05:30Z"))
    h.feed(*calls(10 + 10, timedelta(minutes=1)), now=1001.0)  # 1.00, drawn when 12:01 closes
    h.feed(*calls(10, timedelta(minutes=5)), now=1002.0)  # 12:05, holds the expiry: may still draw
    out = h.feed(*calls(1, timedelta(minutes=6)), now=1003.0)  # 12:05 closes, then the expiry
    g = h.engine.tenants["acme"].credits.grants["trial"]  # type: ignore[union-attr]
    assert (g.status, g.drawn, g.expired) == ("expired", D("2.00"), D("3.00")) and balanced(g)
    assert [(r.kind, r.amount) for r in out.credits] == [("expired", D("3.00"))]
    later = h.feed(*calls(5, timedelta(minutes=7)), *calls(1, timedelta(minutes=8)), now=1004.0)
    assert not later.credits and not [ln for ln in later.lines if ln.credits]


def test_credit_alerts_fire_once_per_grant_and_level() -> None:
    h = run([grant("g", "1.00")], calls(10 + 8, timedelta(minutes=1)), calls(4, timedelta(minutes=2)), calls(1, timedelta(minutes=4)))
    levels = [(a.level, a.grant_id, a.meter) for a in h.alerts if a.meter == "credits"]
    assert levels == [("credit:80%", "g", "credits"), ("credit:100%", "g", "credits")]


def test_a_period_below_its_minimum_gets_one_true_up_that_credits_draw_on() -> None:
    cat = copy.deepcopy(CATALOG)
    cat["plans"][0]["minimum"] = {"amount": "25.00", "product_code": "MIN-COMMIT"}
    h = Harness(catalog=cat)
    h.feed(grant("g", "4.00"), grant("ends-with-march", "9.00", expires_at="2026-04-01T00:00:00Z", priority=1))
    h.feed(*calls(10 + 30, timedelta(minutes=1)), now=1001.0)  # March: 3.00 of usage
    april = datetime(2026, 4, 2, 12, tzinfo=UTC) - T0  # March closes for late events (past its grace)
    h.feed(*calls(1, april), now=1002.0)
    h.feed(*calls(1, april + timedelta(hours=2)), now=1003.0)
    ups = [ln for ln in h.lines if ln.kind == "minimum_true_up"]
    assert [(ln.period, ln.amount, ln.product_code, ln.meter) for ln in ups] == [("2026-03", D("22.00"), "MIN-COMMIT", "minimum")]
    # The March usage drew on the grant expiring with March; the true-up may not (it ends
    # with the period) and draws on the other.
    (up,) = ups
    assert [(c.grant_id, c.amount) for c in up.credits or ()] == [("g", D("4.00"))] and up.net_amount == D("18.00")
    h.feed(*calls(1, april + timedelta(hours=3)), now=1004.0)
    assert len([ln for ln in h.lines if ln.kind == "minimum_true_up"]) == 1


def test_the_read_model_shows_a_true_up_as_the_lines_do() -> None:
    from operators.usage import derive, facts

    cat = copy.deepcopy(CATALOG)
    cat["plans"][0]["minimum"] = {"amount": "25.00", "product_code": "MIN-COMMIT"}
    h = Harness(catalog=cat)
    h.feed(*calls(10 + 30, timedelta(minutes=1)))
    april = datetime(2026, 4, 2, 12, tzinfo=UTC) - T0
    out = h.feed(*calls(1, april), now=1001.0)
    t = h.engine.tenants["acme"]
    final = [(k, mp) for _, k, mp in out.final]  # what the publisher hands over
    march = [derive(h.index, f) for f in facts(t, 0, final) if f.period == "2026-03"]
    assert march and march[0].meters["minimum"].amount == D("22.00")
    lines = [ln for ln in h.lines if ln.period == "2026-03"]
    assert sum(m.amount for m in march[0].meters.values()) == sum(ln.amount for ln in lines) == D("25.00")


def test_the_readme_example_line_by_line() -> None:
    """README, "Prepaid credits": two grants of different priority, one expiring."""
    h = Harness()
    out = h.feed(grant("promo", "3.00", priority=1, expires_at="2026-03-10T12:01:30Z"), grant("prepaid", "5.00"))
    records = list(out.credits)
    for i, n in enumerate([25, 20, 30, 15]):
        records += h.feed(*calls(n, timedelta(minutes=1 + i)), now=1001.0 + i).credits
    records += h.feed(*calls(1, timedelta(minutes=6)), now=1009.0).credits
    got = [(ln.window_start[11:16], ln.amount, [(c.grant_id, c.amount) for c in ln.credits or []], ln.net_amount) for ln in h.lines]
    assert got == [
        ("12:01", D("1.50"), [("promo", D("1.50"))], D(0)),
        ("12:02", D("2.00"), [("prepaid", D("2.00"))], D(0)),
        ("12:03", D("3.00"), [("prepaid", D("3.00"))], D(0)),
        ("12:04", D("1.50"), [], None),
    ]
    assert [(r.kind, r.grant_id, r.amount) for r in records] == [
        ("granted", "promo", D("3.00")),
        ("granted", "prepaid", D("5.00")),
        ("expired", "promo", D("1.50")),
    ]


def test_the_read_model_carries_the_grants_and_what_they_still_cover() -> None:
    from operators.usage import balances, credits_remaining, facts

    h = Harness()
    h.feed(
        grant("promo", "3.00", priority=1, expires_at="2026-03-10T12:01:30Z"),
        grant("prepaid", "5.00"),
        grant("tok", "2.00", meters=["tokens"]),
    )
    h.feed(*calls(25, timedelta(minutes=1)), now=1001.0)
    h.feed(*calls(20, timedelta(minutes=2)), now=1002.0)
    (doc,) = facts(h.engine.tenants["acme"], 0)
    got = {b.grant_id: (b.granted, b.used, b.expired, b.remaining, b.status) for b in balances(doc)}
    assert got == {
        "promo": (D("3.00"), D("1.50"), D("1.50"), D(0), "expired"),
        "prepaid": (D("5.00"), D(0), D(0), D("5.00"), "active"),  # the 12:02 window is still open
        "tok": (D("2.00"), D(0), D(0), D("2.00"), "active"),
    }
    at = int(datetime(2026, 3, 10, 12, 3, tzinfo=UTC).timestamp() * 1000)
    assert credits_remaining(doc, "calls", "USD", at) == D("5.00") and credits_remaining(doc, "tokens", "USD", at) == D("7.00")
