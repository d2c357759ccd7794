"""Fixtures for every test package: one real broker and redis-server per session, fresh
topics and a Redis key prefix per test, and the `integration` marker put on every test that
needs them (so `pytest -m "not integration"` is the fast loop of pure logic)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.stack import LocalStack
from devkit.tryton import TrytonServer
from runtime.settings import Settings, load_settings
from tests.support.events import CATALOG
from tests.support.flows import OwnRedis, write_catalog

_NEEDS_STACK = {"stack", "settings", "own_redis", "tryton"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the broker or Redis is an integration test, whatever its folder;
    tests that start processes of their own say so with the marker themselves."""
    for item in items:
        if _NEEDS_STACK & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """One real broker for the session; each test gets its own topics."""
    with LocalStack(redis=True) as st:
        yield st


@pytest.fixture
def settings(stack: LocalStack) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = load_settings(
        {},
        brokers=stack.brokers,
        redis_url=stack.redis_url,
        redis_prefix=f"t-{tag}",
        input_topic=f"events-{tag}",
        alerts_topic=f"alerts-{tag}",
        rated_topic=f"rated-{tag}",
        dlq_topic=f"dlq-{tag}",
        grace_seconds=600,
        shards=8,
    )
    stack.create_topics({s.topics.input: 3, s.topics.alerts: 1, s.topics.rated: 2, s.topics.dlq: 1})
    return s


@pytest.fixture
def small(settings: Settings, tmp_path: Path) -> Settings:
    """Settings with the small test catalog (tenants acme, bolt, late-co) in a file of its own."""
    path = tmp_path / "catalog.yaml"
    write_catalog(path, CATALOG)
    return settings.replace(catalog=str(path))


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    r = OwnRedis()
    r.start()
    yield r
    if r.p is not None and r.p.poll() is None:
        r.stop()


# The test catalog with two legal entities (SPEC §10.2): its tenants in `us` (company TF-US,
# USD, the Tryton user's own), and `euro-co` on a euro plan in `eu` (company TF-EU, EUR).
ENTITIES_CATALOG: dict[str, Any] = {
    **CATALOG,
    "plans": [
        *CATALOG["plans"],
        {"id": "euro", "version": 1, "currency": "EUR", "meters": {"calls": CATALOG["plans"][0]["meters"]["calls"]}},
    ],
    "tenants": [
        *({**t, "legal_entity": "us"} for t in CATALOG["tenants"]),
        {
            "tenant_id": "euro-co",
            "plan": "euro",
            "crm_account_id": "CRM-4",
            "erp_customer_id": "ERP-4",
            "contract_id": "C-4",
            "legal_entity": "eu",
        },
    ],
    "entities": [
        {"id": "us", "name": "Tallyflow Inc.", "currency": "USD", "erp_company": "TF-US"},
        {"id": "eu", "name": "Tallyflow GmbH", "currency": "EUR", "erp_company": "TF-EU"},
    ],
}


@pytest.fixture(scope="session")
def tryton_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    write_catalog(path, ENTITIES_CATALOG)
    return path


@pytest.fixture(scope="session")
def tryton_template(tryton_catalog: Path) -> Path:
    """A Tryton database set up for the test catalog with entities (parties ERP-1..4 with
    aliases CRM-1..4, products CALLS, TOK, STO, MAU, SEAT, companies TF-US and TF-EU), made
    once (~40 s) and kept between runs. Lines that name no entity go under TF-US."""
    from devkit.tryton import template

    return template(tryton_catalog)


@pytest.fixture
def tryton(tryton_template: Path, tmp_path: Path) -> Iterator[TrytonServer]:
    """A real `trytond` on loopback serving a fresh copy of the template."""
    from devkit.tryton import TrytonServer

    with TrytonServer(tryton_template, tmp_path / "tryton") as server:
        yield server
