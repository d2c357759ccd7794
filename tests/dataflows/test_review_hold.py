"""Review before posting (SPEC §10.1) through the real ERP delivery process, broker, Redis and
sandbox: held lines and draws wait on `usage.review` and never reach the ERP, nor hold back
anything else; `tallyflow review` decides them (who, when, why on `usage.audit`); an
approved item is posted once — across a kill -9 and a restart that reads every decision
again — and a rejected one is parked; reconcile counts them: rated = ERP + held + rejected."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import msgspec
import orjson
import pytest

from devkit.pipeline import wait_until
from devkit.sandbox import Sandbox
from ops.reconcile import Totals, rated_and_acknowledged, rejected_in_review
from runtime.kafka import read_topic
from runtime.settings import Settings, to_env
from schemas.outputs import CreditRecord, HeldItem, ReviewDecision
from tallyflow.cli import main as tallyflow
from tests.dataflows.test_delivery import FlowProcess, produce
from tests.support.lines import rated_line

HELD = "amount_over_limit: USD 250.00 is over the review limit of USD 100.00 per line"


def _held(s: Settings) -> dict[str, HeldItem]:
    return {h.review_id: h for h in (msgspec.json.decode(v, type=HeldItem) for v in read_topic(s.kafka.config(), s.topics.review))}


def _audit(s: Settings) -> list[ReviewDecision]:
    return [msgspec.json.decode(v, type=ReviewDecision) for v in read_topic(s.kafka.config(), s.topics.audit)]


@pytest.mark.integration
def test_held_items_wait_for_a_person_and_an_approved_one_is_posted_once(
    dsettings: Settings,
    sandbox: Sandbox,
    flows: Callable[[str, Settings], FlowProcess],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = dsettings
    for k, v in to_env(s).items():
        monkeypatch.setenv(k, v)
    plain = [rated_line(tenant_id="acme", amount="1.00") for _ in range(3)]
    spike, other = (rated_line(tenant_id="bolt", erp_customer_id="ERP-2", amount="250.00", review=HELD) for _ in range(2))
    draw = CreditRecord(
        record_id="r-1",
        kind="drawn",
        tenant_id="bolt",
        erp_customer_id="ERP-2",
        grant_id="g-1",
        amount=Decimal("5.00"),
        currency="USD",
        at=spike.window_start,
        line_id=spike.line_id,
        period=spike.period,
        review=HELD,
    )
    produce(s, s.topics.rated, [spike, *plain[:2], other, plain[2]])  # bolt's held lines between acme's
    produce(s, s.topics.credits, [draw])
    erp = flows("erp", s)
    lines, credit_records = sandbox.state.endpoints["erp"], sandbox.state.endpoints["erp-credits"]
    wait_until(lambda: set(lines.accepted) == {ln.line_id for ln in plain}, 60, "acme's lines posted, bolt's held or not")
    wait_until(lambda: set(_held(s)) == {spike.line_id, other.line_id, "r-1"}, 60, "the held items on the review topic")
    held = _held(s)
    assert (held[spike.line_id].kind, held[spike.line_id].reason, held[spike.line_id].amount) == ("line", HELD, Decimal("250.00"))
    assert orjson.loads(bytes(held["r-1"].item))["line_id"] == spike.line_id
    assert tallyflow(["review", "list", "--tenant", "bolt"]) == 0
    listed = capsys.readouterr().out
    assert "3 item(s) wait for review, lines USD 500.00" in listed and spike.line_id in listed

    # Decisions: an unknown id, or one without who and why, decides nothing.
    assert tallyflow(["review", "approve", "no-such-id", "--by", "ann", "--why", "checked"]) == 2
    assert tallyflow(["review", "approve", spike.line_id, "--by", "ann", "--why", " "]) == 2
    assert _audit(s) == []
    assert tallyflow(["review", "approve", spike.line_id, "r-1", "--by", "ann", "--why", "the customer confirmed the spike"]) == 0
    assert tallyflow(["review", "reject", other.line_id, "--by", "ann", "--why", "a test tenant's load run"]) == 0
    again = tallyflow(["review", "reject", spike.line_id, "--by", "bob", "--why", "changed my mind"])
    assert again == 1 and "already approved by ann" in capsys.readouterr().err
    audit = _audit(s)
    assert [(d.review_id, d.decision, d.by) for d in audit] == [
        (spike.line_id, "approve", "ann"),
        ("r-1", "approve", "ann"),
        (other.line_id, "reject", "ann"),
    ]
    assert audit[0].why == "the customer confirmed the spike" and audit[0].reason == HELD

    wait_until(lambda: spike.line_id in lines.accepted and "r-1" in credit_records.accepted, 60, "the approved items posted")
    wait_until(
        lambda: any(p["destination"] == "review" for p in (orjson.loads(v) for v in read_topic(s.kafka.config(), s.topics.exceptions))),
        60,
        "the rejected line parked",
    )
    parked = [orjson.loads(v) for v in read_topic(s.kafka.config(), s.topics.exceptions)]
    (p,) = [p for p in parked if p["destination"] == "review"]
    assert p["ids"] == [other.line_id] and "rejected in review by ann: a test tenant's load run" in p["reasons"][other.line_id]

    # kill -9 and a restart that reads everything again (no recovery store): nothing twice.
    erp.kill9()
    flows("erp", s)

    def replayed() -> bool:
        """The restarted process has held the items again and re-read the decisions (it parks the rejected one again)."""
        parks = sum(orjson.loads(v)["destination"] == "review" for v in read_topic(s.kafka.config(), s.topics.exceptions))
        return len(read_topic(s.kafka.config(), s.topics.review)) >= 6 and parks >= 2

    wait_until(replayed, 60, "the restarted delivery to read everything again")
    assert tallyflow(["review", "list"]) == 0 and "nothing waits for review" in capsys.readouterr().out
    want = {ln.line_id for ln in plain} | {spike.line_id}
    wait_until(lambda: set(lines.accepted) == want, 30, "the same lines at the ERP")
    assert lines.duplicates == [] and credit_records.duplicates == [] and other.line_id not in lines.accepted

    review: dict[str, Totals] = {}
    rated, at_erp = rated_and_acknowledged(s, True, rejected=rejected_in_review(s), review=review)
    assert at_erp is not None and at_erp.amount == rated.amount  # rated = ERP + held + rejected
    assert sum(review["rejected"].amount.values()) == Decimal("250.00") and "held" not in review
