from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tallyflow.config import Settings, load_settings
from tallyflow.stack import LocalStack


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
    stack.create_topics({s.input_topic: 3, s.alerts_topic: 1, s.rated_topic: 2, s.dlq_topic: 1})
    return s
