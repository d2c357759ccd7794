"""Legal entities (SPEC §10.2): the catalog says which company of the group invoices each
tenant; its lines, draws and credit records carry it, and reconcile reports per entity."""

from __future__ import annotations

import copy
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from operators import credits
from ops.reconcile import Totals, by_entity
from schemas.catalog import CatalogError, parse_catalog
from schemas.outputs import ENCODER
from tests.operators.test_credits import grant
from tests.support.events import CATALOG, Harness, ev
from tests.support.lines import rated_line

D = Decimal
S = timedelta(seconds=1)
ENTITIES = [
    {"id": "us", "name": "Tallyflow Inc.", "currency": "USD", "erp_company": "Tallyflow Inc."},
    {"id": "eu", "name": "Tallyflow GmbH", "currency": "EUR", "erp_company": "Tallyflow GmbH"},
]


def _catalog() -> dict[str, Any]:
    cat: dict[str, Any] = copy.deepcopy(CATALOG)
    cat["entities"] = copy.deepcopy(ENTITIES)
    for t in cat["tenants"]:
        t["legal_entity"] = "us"
    return cat


def test_lines_draws_grant_records_and_alerts_carry_the_tenants_entity() -> None:
    h = Harness(catalog=_catalog())
    out = h.feed(grant("g-1", "1.00", expires_at="2026-03-10T12:00:30Z"), *[ev("acme", at=i * S) for i in range(25)])
    h.flush()
    (ln,) = [ln for ln in h.lines if ln.tenant_id == "acme"]
    assert ln.legal_entity == "us"
    assert [r.legal_entity for r in credits.line_records(ln)] == ["us"]
    assert [(r.kind, r.legal_entity) for r in out.credits] == [("granted", "us")]
    assert h.alerts and {a.legal_entity for a in h.alerts} == {"us"}  # the threshold alerts too


def test_a_catalog_without_entities_leaves_lines_as_they_were() -> None:
    h = Harness()
    h.feed(*[ev("acme", at=i * S) for i in range(25)])
    h.flush()
    assert h.lines and all(ln.legal_entity is None for ln in h.lines)
    assert b"legal_entity" not in ENCODER.encode(h.lines[0])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["tenants"][1].pop("legal_entity"),
            r"\$\.tenants\[1\]\.legal_entity: tenant 'bolt' names no legal entity; set one of",
        ),
        (lambda c: c["tenants"][0].update(legal_entity="uk"), r"\$\.tenants\[0\]\.legal_entity: no entity 'uk' is declared; use one of"),
        (
            lambda c: c["tenants"][0].update(legal_entity="eu"),
            r"\$\.tenants\[0\]\.plan: plan 'basic' is in USD but entity 'eu' invoices",
        ),
        (lambda c: c["entities"].append(dict(ENTITIES[0])), r"\$\.entities\[2\]\.id: entity 'us' is declared twice"),
        (
            lambda c: c["entities"][1].update(erp_company="Tallyflow Inc."),
            r"\$\.entities\[1\]\.erp_company: 'Tallyflow Inc\.' is already entity 'us''s",
        ),
    ],
)
def test_a_catalog_naming_an_entity_wrongly_stops_with_the_field_named(change: Any, message: str) -> None:
    cat = _catalog()
    change(cat)
    with pytest.raises(CatalogError, match=message):
        parse_catalog(cat)


def test_reconcile_reports_money_per_entity_and_currency() -> None:
    rated, erp = Totals(), Totals()
    for tenant, entity, amount, cur in [("a", "us", "2.00", "USD"), ("b", "us", "3.00", "USD"), ("c", "eu", "4.00", "EUR")]:
        ln = rated_line(tenant_id=tenant, amount=amount, currency=cur, legal_entity=entity)
        rated.add(ln)
        if tenant != "b":
            erp.add(ln, credits=False)
    got = by_entity(rated, erp)
    assert got["us"]["rated USD"] == {"gross": "5.00", "credits": "0", "net": "5.00"}
    assert got["us"]["erp USD"]["gross"] == "2.00"
    assert got["eu"] == {
        "rated EUR": {"gross": "4.00", "credits": "0", "net": "4.00"},
        "erp EUR": {"gross": "4.00", "credits": "0", "net": "4.00"},
    }
