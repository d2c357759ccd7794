"""Fixtures for every test package: one real broker and redis-server per session, fresh
topics and a Redis key prefix per test, and the `integration` marker put on every test that
needs them (so `pytest -m "not integration"` is the fast loop of pure logic)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def tryton_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Tryton database set up for the test catalog (parties ERP-1..3 with aliases CRM-1..3,
    products CALLS, TOK, STO, MAU, SEAT), made once (~30 s) and kept between runs."""
    from devkit.tryton import template

    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    write_catalog(path, CATALOG)
    return template(path)


@pytest.fixture
def tryton(tryton_template: Path, tmp_path: Path) -> Iterator[TrytonServer]:
    """A real `trytond` on loopback serving a fresh copy of the template."""
    from devkit.tryton import TrytonServer

    with TrytonServer(tryton_template, tmp_path / "tryton") as server:
        yield server
