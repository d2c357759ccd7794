"""`tallyflow api` in a thread of this process, on a free loopback port (the demo, the tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from devkit.pipeline import wait_until
from devkit.stack import free_port
from runtime.settings import Settings
from serving.app import build_app
from serving.server import Bounds, config


@contextmanager
def serve(s: Settings, bounds: Bounds | None = None) -> Iterator[str]:
    """The API's base URL while the block runs (as `tallyflow api` runs it: the bounds of
    `s.api` unless given); stopped (in-flight requests finished) after."""
    port = free_port()
    bounds = bounds or Bounds.of(s.api)
    server = uvicorn.Server(config(build_app(s, bounds=bounds), "127.0.0.1", port, bounds, log_level="warning"))
    thread = threading.Thread(target=server.run, name="tallyflow-api", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "the API to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
