"""The whole pipeline on one machine: broker, redis-server, sandbox and the three dataflows
as separate processes, as they run in production. Used by the demo and the bench."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dataflows import FLOWS
from devkit.sandbox import SandboxClient
from devkit.stack import LocalStack, free_port
from runtime.recovery import bytewax_args
from runtime.settings import Settings, load_settings, to_env

T = TypeVar("T")
HMAC_KEY = "local-sandbox-hmac-key"
# Distinct credentials per endpoint, as real systems have: the sandbox checks each one.
CREDENTIALS = {"success_hmac_key": HMAC_KEY, "crm_token": "local-crm-token", "erp_token": "local-erp-token"}
ADMIN_TOKEN = "local-sandbox-admin-token"
RECORDS_IN = "tallyflow_records_total{outcome=in}"


def wait_until(pred: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll a condition until it holds; fail with `what` at the deadline."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)  # polling interval of a condition wait


# One client for every scrape: `httpx.get` builds a client (and its TLS context) per call,
# ~20 ms of CPU, which the demo's pacer and polling loops would spend several times a second.
_HTTP = httpx.Client(timeout=2)


def scrape(port: int) -> dict[str, float]:
    """A local /metrics as {"name{label=value}": number}; empty while nothing listens."""
    try:
        text = _HTTP.get(f"http://127.0.0.1:{port}/metrics").text
    except httpx.TransportError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
    return out


class LocalPipeline:
    def __init__(self, env: dict[str, str] | None = None, partitions: int = 4, recovery: bool = False) -> None:
        self.env = env or {}
        self.partitions = partitions
        self.recovery = recovery
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logdir = Path(tempfile.mkdtemp(prefix="tallyflow-logs-"))

    def __enter__(self) -> LocalPipeline:
        self.stack = LocalStack(redis=True).__enter__()
        # The sandbox is a service of its own, as the real CRM and ERP are: in this process
        # it would compete with the traffic generator for the GIL.
        port = free_port()
        self.sandbox_proc = subprocess.Popen(
            [sys.executable, "-m", "tallyflow.cli", "sandbox", "--port", str(port)],
            env={
                **os.environ,
                **{f"TALLYFLOW_{k.upper()}": v for k, v in CREDENTIALS.items()},
                "TALLYFLOW_SANDBOX_ADMIN_TOKEN": ADMIN_TOKEN,
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.sandbox = SandboxClient(f"http://127.0.0.1:{port}", ADMIN_TOKEN)
        wait_until(self._sandbox_up, 20, "the sandbox to listen")
        self.ports = {name: free_port() for name in FLOWS}  # each dataflow's /metrics, /healthz, /readyz
        self.settings: Settings = load_settings(
            self.env,
            brokers=self.stack.brokers,
            redis_url=self.stack.redis_url,
            crm_url=self.sandbox.url,
            success_url=self.sandbox.url,
            erp_url=self.sandbox.url,
            **CREDENTIALS,
        )
        s = self.settings
        self.stack.create_topics(
            {
                s.topics.input: self.partitions,
                s.topics.alerts: 1,
                s.topics.rated: 2,
                s.topics.dlq: 1,
                s.topics.exceptions: 1,
                s.topics.credits: 1,
                s.topics.review: 1,
                s.topics.audit: 1,
                s.topics.status: 1,
            }
        )
        return self

    def start(self, name: str) -> None:
        env = {**os.environ, **to_env(self.settings), "TALLYFLOW_METRICS_PORT": str(self.ports[name])}
        args: list[str] = []
        if self.recovery:  # one recovery store per dataflow, kept across restarts
            s = self.settings.replace(recovery_dir=str(self.logdir / f"recovery-{name}"))
            args = bytewax_args(s.process, [])
        log = (self.logdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", FLOWS[name], *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def kill(self, name: str) -> None:
        """SIGKILL: no flush, no snapshot, no goodbye."""
        p = self.procs[name]
        p.kill()
        p.wait(10)

    def start_all(self) -> None:
        """The rating, alert-delivery, ERP-delivery and status-delivery dataflows, once rating serves metrics."""
        for name in FLOWS:
            self.start(name)
        wait_until(lambda: RECORDS_IN in self.metrics(), 60, "the rating dataflow to start")

    def wait_rated(self, records: int, timeout: float) -> dict[str, float]:
        """Until the rating dataflow has taken `records` input records and closed every
        window; returns its metrics then."""

        def rated() -> dict[str, float] | None:
            m = self.metrics()
            return m if m.get(RECORDS_IN) == records and m.get("tallyflow_open_windows") == 0 else None

        return wait_until(rated, timeout, f"the rating dataflow to rate {records:,} records")

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"the {name} dataflow exited with {p.returncode}:\n{tail}")

    def metrics(self, name: str = "rate") -> dict[str, float]:
        """A dataflow process's metrics as {"name{label=value}": number}."""
        self.check_alive()
        return scrape(self.ports[name])

    def _sandbox_up(self) -> bool:
        if self.sandbox_proc.poll() is not None:
            raise RuntimeError(f"the sandbox exited with {self.sandbox_proc.returncode}")
        try:
            self.sandbox.state()
            return True
        except httpx.TransportError:
            return False

    def __exit__(self, *exc: object) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.sandbox_proc.terminate()
        self.sandbox_proc.wait(10)
        self.stack.__exit__(*exc)
