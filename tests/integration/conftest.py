from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from devkit.stack import LocalStack
from runtime.settings import Settings, load_settings


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
