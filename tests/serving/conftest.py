"""The API over real HTTP on loopback: uvicorn in a thread, per test, on a free port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from devkit.pipeline import wait_until
from devkit.stack import free_port
from runtime.settings import Settings
from serving.app import SINGLE, build_app

INGEST, READER, SLOW = "ingest-token-0123456789", "read-token-0123456789", "slow-token-0123456789"


@pytest.fixture
def api(small: Settings, tmp_path: Path) -> Iterator[Callable[..., httpx.Client]]:
    tokens = tmp_path / "tokens.yaml"
    clients = [
        {"name": "svc", "token": INGEST, "scopes": ["ingest", "read"]},
        {"name": "dash", "token": READER, "scopes": ["read"]},
        {"name": "slow", "token": SLOW, "scopes": ["ingest"], "rate_per_second": 5},
    ]
    tokens.write_text(yaml.safe_dump({"clients": clients}))
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**flat: object) -> httpx.Client:
        s = small.replace(api_tokens_file=str(tokens), **flat)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(build_app(s), host="127.0.0.1", port=port, log_level="warning", access_log=False))
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        servers.append((server, t))
        wait_until(lambda: server.started, 10, "the API to listen")
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    yield start
    for server, t in servers:
        server.should_exit = True
        t.join(10)


def bearer(token: str, ctype: str = SINGLE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": ctype}
