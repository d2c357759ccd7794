"""Fixtures of the delivery tests: the sandbox, delivery settings with topics of the test's
own, and delivery dataflows as processes (stopped after the test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dataflows import FLOWS
from devkit.sandbox import Sandbox
from devkit.stack import LocalStack
from runtime.settings import Settings
from tests.dataflows.test_delivery import HMAC_KEY, FlowProcess, with_exceptions_topic


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(hmac_key=HMAC_KEY.encode()) as sb:
        yield sb


@pytest.fixture
def dsettings(settings: Settings, stack: LocalStack, sandbox: Sandbox) -> Settings:
    urls = {"crm_url": sandbox.url, "success_url": sandbox.url, "erp_url": sandbox.url}
    return with_exceptions_topic(settings, stack, redis_url=stack.redis_url, success_hmac_key=HMAC_KEY, **urls)


@pytest.fixture
def flows(tmp_path: Path) -> Iterator[Callable[[str, Settings], FlowProcess]]:
    started: list[FlowProcess] = []

    def start(which: str, s: Settings) -> FlowProcess:
        fp = FlowProcess(FLOWS[which], s, tmp_path / f"{which}.log")
        started.append(fp)
        return fp

    yield start
    for fp in started:
        fp.stop()
