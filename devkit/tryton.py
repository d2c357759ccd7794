"""Tryton on loopback for the stack, the demo and the tests.

A database with the modules, company, chart, fiscal years, products and parties takes ~25 s
to make, so it is made once per catalog (and version of the Tallyflow Tryton module) as a
template, and each use gets a copy (~15 ms). `trytond` serves one copy on a free port with
SQLite; stopping the process is how the demo and the tests make an ERP outage.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from devkit.stack import StackError, free_port
from devkit.tryton_setup import ADMIN_LOGIN, ADMIN_PASSWORD, copy_database, write_config
from runtime.settings import Settings
from sinks.tryton import TrytonClient

MODULE_DIR = Path(__file__).resolve().parent.parent / "tryton"
CACHE = Path(tempfile.gettempdir()) / "tallyflow-tryton"


def _bin(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise StackError(f"{name} is not installed in this environment; run `make deps` (it installs the `tryton` extra)")
    return str(path)


def template(catalog: str | Path, cache: Path = CACHE) -> Path:
    """The set-up database for this catalog, made now if no earlier run made it (keyed by the
    catalog, the Tryton module and the set-up script, so a change to any makes a new one)."""
    h = hashlib.sha256(Path(catalog).read_bytes())
    for f in [*sorted(MODULE_DIR.glob("tallyflow_tryton/*")), Path(__file__).with_name("tryton_setup.py")]:
        if f.is_file():
            h.update(f.read_bytes())
    path = cache / f"template_{h.hexdigest()[:12]}.sqlite"
    if path.exists():
        return path
    _bin("trytond-admin")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache))
    r = subprocess.run(
        [sys.executable, "-m", "devkit.tryton_setup", str(work / "setup.sqlite"), str(catalog)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if r.returncode != 0:
        raise StackError(f"setting up the Tryton database failed:\n{(r.stderr or r.stdout)[-3000:]}")
    os.replace(work / "setup.sqlite", path)  # atomic: a concurrent maker's copy is just as good
    return path


class TrytonServer:
    """`trytond` serving a copy of a template, on a free loopback port, until `stop()`."""

    def __init__(self, template_path: Path, workdir: Path, name: str = "tallyflow") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.database = name
        self.db_path = copy_database(template_path, self.dir / f"{name}.sqlite")
        self.port = free_port()
        self.conf = write_config(self.dir, self.dir / f"{name}.conf", listen=f"127.0.0.1:{self.port}")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, s: Settings) -> Settings:
        """`s` pointed at this server as its Tryton."""
        return s.replace(tryton_url=self.url, tryton_database=self.database, tryton_user=ADMIN_LOGIN, tryton_password=ADMIN_PASSWORD)

    def client(self, s: Settings | None = None) -> TrytonClient:
        return TrytonClient(self.settings(s or Settings()).tryton)

    def start(self, deadline_s: float = 60.0) -> TrytonServer:
        self._log = open(self.dir / "trytond.log", "ab")  # noqa: SIM115 - kept open while it runs
        self.proc = subprocess.Popen(
            [_bin("trytond"), "-c", str(self.conf), "-d", self.database],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        end = time.monotonic() + deadline_s
        body = {"id": 0, "method": "common.server.version", "params": []}
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise StackError(f"trytond exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.post(self.url + "/rpc/", json=body, timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise StackError(f"trytond did not answer on {self.url} within {deadline_s:.0f}s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.dir / "trytond.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TrytonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
