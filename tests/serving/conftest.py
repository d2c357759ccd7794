"""The API over real HTTP on loopback: uvicorn in a thread, per test, on a free port, with the
configuration `tallyflow api` runs with (serving/server.py: its bounds on slow clients)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from devkit.api import serve
from runtime.settings import Settings
from serving.app import SINGLE
from serving.server import Bounds

INGEST, READER, SLOW = "ingest-token-0123456789", "read-token-0123456789", "slow-token-0123456789"
ACME, LATE = "acme-only-token-0123456789", "late-prefix-token-0123456789"  # bound to tenants
BILLING = "billing-token-0123456789"  # grants and voids credits
REVIEWER = "finance-token-0123456789"  # the review desk


@pytest.fixture
def api(small: Settings, tmp_path: Path) -> Iterator[Callable[..., httpx.Client]]:
    tokens = tmp_path / "tokens.yaml"
    clients = [
        {"name": "svc", "token": INGEST, "scopes": ["ingest", "read"]},
        {"name": "dash", "token": READER, "scopes": ["read"]},
        {"name": "slow", "token": SLOW, "scopes": ["ingest"], "rate_per_second": 5},
        {"name": "acme-portal", "token": ACME, "scopes": ["ingest", "read"], "tenants": ["acme"]},
        {"name": "late-portal", "token": LATE, "scopes": ["read"], "tenants": ["late-*"]},
        {"name": "billing", "token": BILLING, "scopes": ["credits:write", "ingest", "read"]},
        {"name": "finance", "token": REVIEWER, "scopes": ["review:write"]},
        {"name": "acme-finance", "token": "acme-finance-token-0123", "scopes": ["review:write"], "tenants": ["acme"]},
    ]
    tokens.write_text(yaml.safe_dump({"clients": clients}))
    with contextlib.ExitStack() as running:

        def start(bounds: Bounds | None = None, **flat: object) -> httpx.Client:
            url = running.enter_context(serve(small.replace(api_tokens_file=str(tokens), **flat), bounds))
            return running.enter_context(httpx.Client(base_url=url, timeout=30))

        yield start


def bearer(token: str, ctype: str = SINGLE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": ctype}
