"""/metrics, /healthz and /readyz on one port, for every dataflow process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from operators.stats import Stats
from runtime.metrics import BUILD, StatsCollector


class Health:
    """Liveness and readiness of this process.

    Live: the process answers. A worker blocked in a sink while a destination is down is
    backpressure doing its job, not a hang, so liveness does not judge progress (a restart
    would only repeat the wait). Ready: the dataflow was built, its worker has joined the
    cluster (it listed its input partitions), and no dependency check names a problem."""

    def __init__(self) -> None:
        self.built = False
        self.running = False
        self.checks: dict[str, Callable[[], str | None]] = {}

    def problems(self) -> list[str]:
        out = [] if self.built else ["dataflow not built yet"]
        if not self.running:
            out.append("worker has not joined the cluster yet")
        for name, check in self.checks.items():
            why = check()
            if why:
                out.append(f"{name}: {why}")
        return out


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b'{"status":"ok"}', "application/json")
        elif path == "/readyz":
            problems = HEALTH.problems()
            body = orjson.dumps({"status": "not ready" if problems else "ready", "problems": problems})
            self._send(503 if problems else 200, body, "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds are not news
        pass


def serve(port: int, dataflow: str, stats: Stats | None = None) -> ThreadingHTTPServer | None:
    """Expose /metrics, /healthz and /readyz on `port` (0: do nothing)."""
    BUILD.labels(version("tallyflow"), dataflow).set(1)
    if not port:
        return None
    if stats is not None:
        REGISTRY.register(StatsCollector(stats))
    server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="observability", daemon=True).start()
    return server
