"""Helpers for tests that run the rating dataflow against the real broker and Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import yaml
from bytewax._bytewax import cli_main
from confluent_kafka import Producer

from dataflows import FLOWS
from dataflows.rating import Bounds, build_flow
from devkit.pipeline import wait_until
from devkit.stack import free_port, redis_binary
from operators.stats import Stats
from runtime.kafka import read_topic
from runtime.settings import Settings, to_env
from schemas.outputs import RatedUsageLine

D = Decimal


MIN = timedelta(minutes=1)


def produce_events(s: Settings, values: list[bytes], key: bytes = b"acme") -> dict[int, int]:
    """Produce to partition 0; return the exclusive end offsets."""
    ends: dict[int, int] = {}
    p = Producer({"bootstrap.servers": s.kafka.brokers})
    for v in values:
        p.produce(s.topics.input, v, key, partition=0, on_delivery=lambda err, m: ends.__setitem__(m.partition(), m.offset() + 1))
    p.flush()
    return ends


def run_bounded(s: Settings, ends: dict[int, int], start: dict[int, int] | None = None) -> Stats:
    stats = Stats()
    cli_main(build_flow(s, bounds=Bounds(ends, start), stats=stats, snapshots=False))
    return stats


def rated_lines(s: Settings) -> list[RatedUsageLine]:
    return [msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated)]


def write_catalog(path: Path, catalog: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(catalog))
    tmp.replace(path)  # atomic, as a ConfigMap update is


class OwnRedis:
    """A redis-server of the test's own, to take away and bring back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.p = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: pings(self.port), 10, "redis-server to answer")

    def stop(self) -> None:
        assert self.p is not None
        self.p.kill()
        self.p.wait(10)


def pings(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


def start_rating(s: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", FLOWS["rate"]],
        env={**os.environ, **to_env(s), **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def rated_count(s: Settings) -> int:
    return sum(ln.event_count for ln in rated_lines(s))
