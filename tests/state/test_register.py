"""The emission register against a real redis-server: replays settled by difference,
history, compare-and-set against another writer, totals from before it existed."""

from __future__ import annotations

from devkit.stack import LocalStack
from runtime.settings import Settings
from schemas.outputs import RatedUsageLine
from state.register import EmissionRegister
from tests.support.flows import D
from tests.support.lines import rated_line


def _t3(totals: dict) -> dict:  # type: ignore[type-arg]
    """Quantity, amount and events of each key (the tests of credits look at the fourth)."""
    return {k: v[:3] for k, v in totals.items()}


def line(qty: int, amount: str, *, events: int, revision: int = 0, start: str = "2026-03-10T12:00:00.000Z") -> RatedUsageLine:
    return rated_line(line_id="engine-id", quantity=qty, amount=amount, event_count=events, revision=revision, at=start)


def test_register_settles_a_divergent_replay_by_difference(stack: LocalStack, settings: Settings) -> None:
    prefix = settings.stores
    reg = EmissionRegister(prefix)
    first = reg.settle([line(12, "0.20", events=12)], [(D(12), D("0.20"), 12)])
    assert [(ln.quantity, ln.amount, ln.revision) for ln in first.lines] == [(12, D("0.20"), 0)]
    # The process dies before the Kafka flush is confirmed: the next one sends the line again
    # (same id) with whatever it emits for that key, and a replay that re-derives the same
    # totals adds nothing.
    again = EmissionRegister(prefix)
    same = again.settle([line(12, "0.20", events=12)], [(D(12), D("0.20"), 12)])
    assert [ln.line_id for ln in same.lines] == [first.lines[0].line_id] and same.resent == 1
    again.confirm(same.confirm, now=True)
    # A replay that saw the window close with 15 events instead: a correction of +3.
    third = EmissionRegister(prefix)
    diff = third.settle([line(15, "0.50", events=15)], [(D(15), D("0.50"), 15)])
    assert diff.resent == 0
    assert [(ln.quantity, ln.amount, ln.event_count, ln.revision) for ln in diff.lines] == [(3, D("0.30"), 3, 1)]
    assert diff.lines[0].line_id != first.lines[0].line_id
    assert _t3(third.totals([third.key(diff.lines[0])])) == {third.key(diff.lines[0]): (D(15), D("0.50"), 15)}
    # A dry run computes the same way and writes nothing.
    dry = third.settle([line(16, "0.60", events=16)], [(D(16), D("0.60"), 16)], dry_run=True)
    assert [ln.quantity for ln in dry.lines] == [1] and dry.confirm == {}
    assert _t3(third.totals([third.key(diff.lines[0])]))[third.key(diff.lines[0])][0] == 15


def test_register_history_skips_replayed_states_only_until_the_replay_diverges(stack: LocalStack, settings: Settings) -> None:
    prefix = settings.stores
    live = EmissionRegister(prefix)
    # Before the crash: window 1 closed with events a, b; window 2 with c.
    s1 = live.settle([line(2, "0", events=2)], [(D(2), D(0), 2)])
    s2 = live.settle([line(1, "0", events=1, start="2026-03-10T12:01:00.000Z")], [(D(3), D(0), 3)])
    live.confirm(s1.confirm, now=True)
    live.confirm(s2.confirm, now=True)
    # A replay that repeats history emits nothing...
    same = EmissionRegister(prefix)
    assert same.settle([line(2, "0", events=2)], [(D(2), D(0), 2)]).lines == []
    # ...but one whose window 1 closed early with a alone diverges: -1 now, and when b comes
    # as a correction (back at the old state (2, 0, 2)) it must go out, not be taken for history.
    replay = EmissionRegister(prefix)
    out = [replay.settle([line(1, "0", events=1)], [(D(1), D(0), 1)])]
    out.append(replay.settle([line(1, "0", events=1, revision=1)], [(D(2), D(0), 2)]))
    out.append(replay.settle([line(1, "0", events=1, start="2026-03-10T12:01:00.000Z")], [(D(3), D(0), 3)]))
    sent = [ln for o in out for ln in o.lines]
    assert [ln.quantity for ln in sent] == [-2, 1, 1]
    assert s1.lines[0].quantity + s2.lines[0].quantity + sum(ln.quantity for ln in sent) == 3
    for o in out:
        replay.confirm(o.confirm, now=True)
    # A later process replaying the new lineage skips its states, and not the abandoned one's.
    after = EmissionRegister(prefix)
    assert after.settle([line(1, "0", events=1)], [(D(1), D(0), 1)]).lines == []


def test_register_rereads_a_key_another_process_wrote(stack: LocalStack, settings: Settings) -> None:
    """The live process caches its keys; a replay writing one meanwhile must not make the
    live process bill the same usage again."""
    prefix = settings.stores
    live = EmissionRegister(prefix)
    first = live.settle([line(2, "0.20", events=2)], [(D(2), D("0.20"), 2)])
    live.confirm(first.confirm, now=True)
    # A replay at the fixed price re-rates windows 1 and 2 (the live engine's window 2 is open).
    replay = EmissionRegister(prefix)
    fix = replay.settle([line(5, "0.60", events=5)], [(D(5), D("0.60"), 5)], correction=True)
    replay.confirm(fix.confirm, now=True)
    assert [(ln.quantity, ln.amount, ln.revision) for ln in fix.lines] == [(3, D("0.40"), 1)]
    # The live engine (restarted with the fixed catalog) closes window 2: nothing is left to bill.
    second = live.settle([line(3, "0.40", events=3, start="2026-03-10T12:01:00.000Z")], [(D(5), D("0.60"), 5)])
    assert second.lines == []
    third = live.settle([line(1, "0.12", events=1, start="2026-03-10T12:02:00.000Z")], [(D(6), D("0.72"), 6)])
    assert [(ln.quantity, ln.amount) for ln in third.lines] == [(1, D("0.12"))]
    assert sum(ln.amount for part in (first, fix, second, third) for ln in part.lines) == D("0.72")


def test_register_takes_totals_from_before_it_existed_as_emitted(stack: LocalStack, settings: Settings) -> None:
    reg = EmissionRegister(settings.stores)
    out = reg.settle([line(2, "0.20", events=2, revision=0)], [(D(10), D("1.00"), 10)])
    assert [(ln.quantity, ln.amount, ln.event_count, ln.revision) for ln in out.lines] == [(2, D("0.20"), 2, 0)]


def test_a_write_retried_after_a_socket_timeout_is_recognised_not_taken_for_another_writer(stack: LocalStack, settings: Settings) -> None:
    """Issue 18: a script past the client's socket timeout still runs in Redis; the retry must
    find its own earlier attempt done (not a conflict to read back and re-send as pending)."""
    import redis

    from operators.delivery import Backoff

    reg = EmissionRegister(settings.stores)
    real = reg._write_script
    calls: list[int] = []

    def times_out_after_running(*a: object, **kw: object) -> object:
        calls.append(1)
        out = real(*a, **kw)  # type: ignore[arg-type]
        if len(calls) == 1:
            raise redis.TimeoutError("Timeout reading from socket")  # it ran; the client did not hear
        return out

    reg._write_script = times_out_after_running  # type: ignore[assignment]
    reg.patience.backoff = Backoff(0.01, 0.01)
    out = reg.settle([line(12, "0.20", events=12)], [(D(12), D("0.20"), 12)])
    assert len(calls) == 2
    assert out.resent == 0 and [(ln.quantity, ln.revision) for ln in out.lines] == [(12, 0)]
    assert _t3(reg.totals([reg.key(out.lines[0])])) == {reg.key(out.lines[0]): (D(12), D("0.20"), 12)}


def test_a_large_write_is_cut_into_short_script_calls(stack: LocalStack, settings: Settings) -> None:
    """An idle flush of many tenants at once: no single script holds Redis for all of them."""
    from state import register

    reg = EmissionRegister(settings.stores)
    real = reg._write_script
    sizes: list[int] = []

    def counting(*a: object, **kw: object) -> object:
        args = kw["args"]
        assert isinstance(args, list)
        sizes.append(len(args))
        return real(*a, **kw)  # type: ignore[arg-type]

    reg._write_script = counting  # type: ignore[assignment]
    n = 2 * register.CHUNK_KEYS + 7
    lines = [rated_line(line_id=f"x{i}", tenant_id=f"t-{i}", quantity=1, amount="0.01") for i in range(n)]
    out = reg.settle(lines, [(D(1), D("0.01"), 1)] * n)
    assert len(out.lines) == n and len(sizes) == 3
    assert max(sizes) < 14 * register.CHUNK_KEYS + 10  # ~13 arguments per key
    keys = [reg.key(ln) for ln in lines]
    assert set(_t3(reg.totals(keys)).values()) == {(D(1), D("0.01"), 1)}
    # Read back in chunks too: a restarted process settling all of them finds them all emitted.
    again = EmissionRegister(settings.stores)
    assert again.settle(lines, [(D(1), D("0.01"), 1)] * n, read=set(keys)).lines[n:] == []


def test_patience_waits_out_a_busy_script_but_not_other_errors() -> None:
    import pytest
    import redis

    from operators.delivery import Backoff
    from runtime.redis import Patience

    p = Patience("test", Backoff(0.001, 0.001))
    answers: list[Exception | str] = [redis.ResponseError("BUSY Redis is busy running a script."), "ok"]

    def call() -> str:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert p(call) == "ok"
    answers[:] = [redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")]
    with pytest.raises(redis.ResponseError):
        p(call)


def test_each_matrix_cell_is_settled_on_its_own(stack: LocalStack, settings: Settings) -> None:
    """Two cells of one meter and window telescope apart (their own key, their own ids)."""
    reg = EmissionRegister(settings.stores)
    large = rated_line(line_id="a", quantity=10, amount="0.03", dimensions={"model": "large"})
    small = rated_line(line_id="b", quantity=10, amount="0.01", dimensions={"model": "small"})
    out = reg.settle([large, small], [(D(10), D("0.03"), 1), (D(10), D("0.01"), 1)])
    assert [(ln.dimensions, ln.quantity, ln.amount) for ln in out.lines] == [
        ({"model": "large"}, 10, D("0.03")),
        ({"model": "small"}, 10, D("0.01")),
    ]
    assert reg.key(large) != reg.key(small) and out.lines[0].line_id != out.lines[1].line_id
    assert _t3(reg.totals([reg.key(small)])) == {reg.key(small): (D(10), D("0.01"), 1)}


def test_a_replay_that_used_up_a_grant_corrects_the_expiry_the_first_run_emitted(stack: LocalStack, settings: Settings) -> None:
    """SPEC §9.5: per grant granted = drawn - returned + expired + voided + remaining, also
    across a crash. The first run expired 5.00 of a trial; its replay drew it all first (the
    idle clock closed a window earlier) and expires nothing: that record of 0 corrects the
    first (-5.00, seq 2), while a record of 0 with nothing before it goes nowhere."""
    from decimal import Decimal

    from schemas.outputs import CreditRecord

    def expired(amount: str, grant: str = "trial") -> CreditRecord:
        return CreditRecord(
            record_id=f"exp-{grant}", kind="expired", tenant_id="acme", erp_customer_id="ERP-1", grant_id=grant,
            amount=Decimal(amount), currency="USD", at="2026-03-10T12:30:00.000Z",
        )  # fmt: skip

    reg = EmissionRegister(settings.stores)
    out, commit = reg.settle_records([expired("5.00"), expired("0", "promo")])
    assert [(r.grant_id, r.amount) for r in out] == [("trial", Decimal("5.00"))]  # no record of nothing
    reg.commit_records(commit)
    again = EmissionRegister(settings.stores)
    out, commit = again.settle_records([expired("0"), expired("0", "promo")])
    assert [(r.grant_id, r.amount, r.seq) for r in out] == [("trial", Decimal("-5.00"), 2)]
    assert out[0].record_id != "exp-trial"
    again.commit_records(commit)
    assert again.settle_records([expired("0")])[0] == []  # settled: a further replay adds nothing
