"""The operations tools' arguments against the catalog (issue 23 item 2): a typo in a period,
tenant, customer, reason or destination is an error naming the option and the fix, never a
run that finds nothing. Pure: no broker, no Redis."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from operators.catalog_index import CatalogIndex
from ops import arguments, dlq
from ops.arguments import ArgumentError
from runtime.settings import load_settings
from schemas.catalog import parse_catalog
from schemas.errors import TallyflowError
from schemas.outputs import DeadLetter
from tests.support.events import CATALOG

CAT = CatalogIndex.build(parse_catalog(CATALOG))  # acme, bolt, late-co; plans basic and plus, both monthly
NOW = int(datetime(2026, 12, 2, 16, 37, tzinfo=UTC).timestamp() * 1000)


def with_daily_plan() -> CatalogIndex:
    cat = copy.deepcopy(CATALOG)
    cat["plans"].append({**cat["plans"][1], "id": "daily", "billing_period": "day"})
    cat["tenants"].append({"tenant_id": "dayco", "plan": "daily", "crm_account_id": "C", "erp_customer_id": "ERP-9", "contract_id": "K"})
    return CatalogIndex.build(parse_catalog(cat))


def refused(fn, *args, **kw) -> str:
    with pytest.raises(ArgumentError) as e:
        fn(*args, **kw)
    assert isinstance(e.value, TallyflowError)  # the CLI prints it as one line, exit code 2
    return str(e.value)


@pytest.mark.parametrize(
    "period, why",
    [
        ("2026-13", "--period '2026-13': not a billing period; write YYYY-MM, e.g. 2026-12"),
        ("banana", "--period 'banana': not a billing period; write YYYY-MM, e.g. 2026-12"),
        ("2026-1", "--period '2026-1': not a billing period; write YYYY-MM, e.g. 2026-12"),
        ("26-11", "--period '26-11': not a billing period; write YYYY-MM, e.g. 2026-12"),
        ("2026-11-05", "--period '2026-11-05': the catalog's plans bill by month, not by day; write YYYY-MM"),
        ("2062-11", "--period '2062-11': that period has not begun; the current one is 2026-12"),
    ],
)
def test_a_period_that_cannot_be_meant_is_refused_with_the_form_to_use(period, why):
    assert refused(arguments.periods, CAT, ["2026-11", period], now_ms=NOW) == why


def test_periods_the_plans_bill_by_pass():
    assert arguments.periods(CAT, ["2026-11", "2026-12", "2020-01"], now_ms=NOW) == ["2026-11", "2026-12", "2020-01"]
    daily = with_daily_plan()
    assert arguments.periods(daily, ["2026-11", "2026-11-05"], now_ms=NOW) == ["2026-11", "2026-11-05"]
    assert refused(arguments.periods, daily, ["2026-11-31"], now_ms=NOW) == (
        "--period '2026-11-31': not a billing period; write YYYY-MM (monthly plans) or YYYY-MM-DD (daily plans), e.g. 2026-12"
    )
    # For chosen tenants: the periods their own plans bill by.
    assert arguments.periods(daily, ["2026-11-05"], tenant_ids=["dayco"], now_ms=NOW) == ["2026-11-05"]
    assert refused(arguments.periods, daily, ["2026-11-05"], tenant_ids=["acme"], now_ms=NOW) == (
        "--period '2026-11-05': the plans of acme bill by month, not by day; write YYYY-MM"
    )
    # Events may be a few minutes ahead of the clock: a period beginning within that is not refused.
    assert arguments.periods(CAT, ["2027-01"], now_ms=int(datetime(2026, 12, 31, 23, 58, tzinfo=UTC).timestamp() * 1000)) == ["2027-01"]


def test_a_tenant_or_customer_not_in_the_catalog_is_refused_with_the_nearest_name():
    assert arguments.tenants(CAT, ["acme", "late-co"]) == ["acme", "late-co"]
    assert refused(arguments.tenants, CAT, ["acme", "acmee"]) == "--tenant 'acmee': no such tenant in the catalog; did you mean 'acme'?"
    assert refused(arguments.tenants, CAT, ["zzz"]) == "--tenant 'zzz': no such tenant in the catalog"
    assert arguments.customers(CAT, ["ERP-2"]) == ["ERP-2"]
    assert refused(arguments.customers, CAT, ["ERP-22"]) == (
        "--customer 'ERP-22': no tenant in the catalog has that erp_customer_id; did you mean 'ERP-2'?"
    )


def test_closed_lists_name_their_values():
    assert refused(arguments.one_of, ["erp", "ero"], ["erp", "crm", "success"], "--destination") == (
        "--destination 'ero': not one of erp, crm, success; did you mean 'erp'?"
    )


def dead(tenant: str | None) -> DeadLetter:
    return DeadLetter(
        reason="unknown_tenant", message="", payload=b"{}", topic="t", partition=0, offset=0, received_at="", tenant_id=tenant
    )


def test_dlq_takes_a_tenant_of_the_catalog_or_of_the_dead_letters(tmp_path):
    """A tenant not onboarded yet is only in its dead letters, and `dlq --tenant newco` must show them."""
    from tests.support.flows import write_catalog

    path = tmp_path / "catalog.yaml"
    write_catalog(path, CATALOG)
    s = load_settings({}, catalog=str(path))
    letters = [dead("newco"), dead(None)]
    dlq.unknown_tenants(s, letters, ["newco", "acme"])  # in the dead letters; in the catalog
    with pytest.raises(ArgumentError, match=r"^--tenant 'newc0': no such tenant in the catalog nor in usage.dlq; did you mean 'newco'\?$"):
        dlq.unknown_tenants(s, letters, ["newc0"])
    # Only what the dead letters name: the catalog is not even read (draining must not need it).
    dlq.unknown_tenants(load_settings({}, catalog=str(tmp_path / "missing.yaml")), letters, ["newco"])
