"""The rating dataflow as a StatefulSet runs it: N local processes, each given exactly the
environment and files the dev overlay's StatefulSet gives pod <name>-<i> (endpoints and
paths mapped to this machine), forming one Bytewax cluster. Its totals must equal those of
a single process; and a rescale (stop all, start with another count, resume from the shared
recovery store), as the runbook does it, must not change them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
from bytewax._bytewax import cli_main

from dataflows.rating import Bounds, build_flow
from devkit.generator import produce
from devkit.pipeline import scrape, wait_until
from devkit.stack import LocalStack, free_port
from runtime.kafka import read_topic
from runtime.settings import Settings
from schemas.catalog import load_catalog
from schemas.outputs import DeadLetter, RatedUsageLine, ThresholdAlert
from tests.support.events import hostile
from tests.support.k8s import mounted_files, pod_env, render

STS = "tallyflow-rating"
POD_ROOTS = ("/etc/tallyflow", "/var/lib/tallyflow", "/var/run/tallyflow")
Totals = dict[tuple[str, str, str], tuple[Decimal, Decimal, int]]


def _totals(lines: list[RatedUsageLine]) -> Totals:
    """Per tenant, meter and period: quantity, amount and events; a line a crash replay put
    on the topic twice counts once (the ERP dedupes by line id the same way)."""
    out: dict[tuple[str, str, str], list[object]] = defaultdict(lambda: [Decimal(0), Decimal(0), 0])
    for ln in {ln.line_id: ln for ln in lines}.values():
        t = out[(ln.tenant_id, ln.meter, ln.period)]
        t[0], t[1], t[2] = t[0] + ln.quantity, t[1] + ln.amount, t[2] + ln.event_count  # type: ignore[operator]
    return {k: (v[0], v[1], v[2]) for k, v in out.items() if v[0] or v[1]}  # type: ignore[misc]


class _Pods:
    """Processes started as the StatefulSet starts its pods."""

    def __init__(self, settings: Settings, stack: LocalStack, tmp: Path) -> None:
        self.docs = render("dev")
        self.s = settings
        self.stack = stack
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for path, text in mounted_files(self.docs, STS).items():  # the ConfigMap and Secret volumes
            f = self._local(path)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)

    def _local(self, pod_path: str) -> Path:
        return self.tmp / pod_path.lstrip("/")

    def env(self, ordinal: int, metrics_port: int) -> dict[str, str]:
        env = pod_env(self.docs, STS, ordinal)
        for k, v in env.items():
            if v.startswith(POD_ROOTS):
                env[k] = str(self._local(v))
        s = self.s
        env.update(  # the cluster's services and this test's own topics and keys
            TALLYFLOW_BROKERS=s.kafka.brokers,
            TALLYFLOW_REDIS_URL=s.stores.redis_url,
            TALLYFLOW_REDIS_PREFIX=s.stores.redis_prefix,
            TALLYFLOW_INPUT_TOPIC=s.topics.input,
            TALLYFLOW_ALERTS_TOPIC=s.topics.alerts,
            TALLYFLOW_RATED_TOPIC=s.topics.rated,
            TALLYFLOW_DLQ_TOPIC=s.topics.dlq,
            TALLYFLOW_METRICS_PORT=str(metrics_port),  # pods have a port each; here they share a host
            TALLYFLOW_IDLE_TIMEOUT_SECONDS="2",
            TALLYFLOW_SNAPSHOT_INTERVAL_SECONDS="1",
            TALLYFLOW_GRACE_SECONDS=str(int(s.engine.grace_seconds)),
        )
        return env

    def start(self, replicas: int) -> None:
        """What the StatefulSet does for `replicas`: start every pod at once (Parallel), each
        with its ordinal; the headless Service's names become loopback ports here."""
        hosts = [f"127.0.0.1:{free_port()}" for _ in range(replicas)]
        self.ports = [free_port() for _ in range(replicas)]
        for i in range(replicas):
            env = self.env(i, self.ports[i])
            hostfile = Path(env["BYTEWAX_HOSTFILE_PATH"])
            hostfile.parent.mkdir(parents=True, exist_ok=True)
            hostfile.write_text("\n".join(hosts) + "\n")
            log = (self.tmp / f"pod-{replicas}-{i}.log").open("ab")
            # The container's command: ENTRYPOINT tallyflow, args ["rate"].
            cmd = [sys.executable, "-m", "tallyflow.cli", "rate"]
            self.procs.append(subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT))

    def records_in(self) -> float:
        for p in self.procs:
            assert p.poll() is None, f"a pod exited with {p.returncode}; logs in {self.tmp}"
        return sum(scrape(port).get("tallyflow_records_total{outcome=in}", 0) for port in self.ports)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()  # as a node loss would; a graceful stop replays less, never differently
            p.wait(10)
        self.procs = []


def test_statefulset_pods_as_processes_match_one_process_and_survive_a_rescale(
    settings: Settings, stack: LocalStack, tmp_path: Path
) -> None:
    s = settings.replace(input_topic=settings.topics.input + "-p4")
    stack.create_topics({s.topics.input: 4})
    pods = _Pods(s, stack, tmp_path)
    s = s.replace(catalog=str(pods._local("/etc/tallyflow/catalog/catalog.yaml")))  # the ConfigMap's
    cat = load_catalog(s.process.catalog)
    start = datetime(2026, 11, 2, tzinfo=UTC)

    def traffic(seed: int, at: datetime) -> dict[int, int]:
        return produce(s.kafka.brokers, s.topics.input, hostile(12_000, 60, seed, at, timedelta(minutes=20)), cat).end_offsets

    half = traffic(5, start)
    # Two pods take the first half ...
    pods.start(2)
    wait_until(lambda: pods.records_in() >= sum(half.values()), 90, "two pods to read the first half")
    pods.stop()
    ends = traffic(6, start + timedelta(minutes=20))

    # The whole input through one process, in this process, to topics and keys of its own.
    one = s.replace(
        rated_topic=s.topics.rated + "-one",
        alerts_topic=s.topics.alerts + "-one",
        dlq_topic=s.topics.dlq + "-one",
        redis_prefix=s.stores.redis_prefix + "-one",
    )
    stack.create_topics({one.topics.rated: 1, one.topics.alerts: 1, one.topics.dlq: 1})
    cli_main(build_flow(one, bounds=Bounds(ends), snapshots=False))  # type: ignore[no-untyped-call]
    want = _totals([msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, one.topics.rated)])
    assert sum(t[2] for t in want.values()) > 20_000

    # ... then the StatefulSet is scaled to three: all pods start again, resume from the
    # shared recovery store and read the second half.
    pods.start(3)

    def cluster_totals() -> Totals:
        return _totals([msgspec.json.decode(v, type=RatedUsageLine) for v in read_topic(s.kafka.brokers, s.topics.rated)])

    try:
        wait_until(lambda: cluster_totals() == want, 120, "the three-pod cluster's totals to equal the single process's")
    finally:
        pods.stop()
    alerts = {msgspec.json.decode(v, type=ThresholdAlert).alert_id for v in read_topic(s.kafka.brokers, s.topics.alerts)}
    assert alerts == {msgspec.json.decode(v, type=ThresholdAlert).alert_id for v in read_topic(s.kafka.brokers, one.topics.alerts)}

    def dead(topic: str) -> Counter[str]:
        ds = [msgspec.json.decode(v, type=DeadLetter) for v in read_topic(s.kafka.brokers, topic)]
        return Counter({(d.partition, d.offset, d.index): d.reason for d in ds}.values())

    assert dead(s.topics.dlq) == dead(one.topics.dlq) and sum(dead(one.topics.dlq).values()) > 200
