"""A real Prometheus server (the Debian package) scraping local targets, for the tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import yaml

from devkit.pipeline import wait_until
from devkit.stack import free_port


class Prometheus:
    def __init__(self, targets: dict[str, int], interval_s: float = 1.0) -> None:
        """`targets`: job name -> local port serving /metrics."""
        self.targets = targets
        self.interval_s = interval_s
        self.dir = Path(tempfile.mkdtemp(prefix="tallyflow-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed; `make deps` installs the Debian package"
        cfg = {
            "global": {"scrape_interval": f"{int(self.interval_s * 1000)}ms", "evaluation_interval": f"{int(self.interval_s * 1000)}ms"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for job, port in self.targets.items()
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, 30, "Prometheus to be ready")
        return self

    def _ready(self) -> bool:
        assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()[-2000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query's vector as {"label=value,...": number}."""
        out: dict[str, float] = {}
        for res in self.api("query", query=expr)["result"]:
            labels = ",".join(f"{k}={v}" for k, v in sorted(res["metric"].items()) if k != "__name__")
            out[labels] = float(res["value"][1])
        return out

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
