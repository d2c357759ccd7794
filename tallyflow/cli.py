"""`tallyflow` command line: run dataflows, generate traffic, the local stack, checks."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timedelta

from schemas.catalog import load_catalog
from schemas.errors import TallyflowError
from tallyflow import kafka
from tallyflow.config import ConfigError, kafka_config, load_settings


def _with_brokers(fn: Callable[[list[str]], int], rest: list[str]) -> int:
    """Commands that need the brokers stop at once, with one line, when they do not answer."""
    if not {"-h", "--help"} & set(rest):
        kafka.ensure_reachable(kafka_config(load_settings()))
    return fn(rest)


def _run_flow(name: str, rest: list[str]) -> int:
    """Replace this process with `python -m bytewax.run` on a flow, so every Bytewax option
    (-w, -i/-a, -r/-s/-b, the StatefulSet environment) works unchanged."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # PID 1 in a pod: stop even before Bytewax runs
    s = load_settings()
    if name == "rate":
        load_catalog(s.catalog)  # fail fast, with the field named, before Bytewax starts
    kafka.ensure_reachable(kafka_config(s))
    from tallyflow.cluster import prepare
    from tallyflow.pipeline import FLOWS
    from tallyflow.recovery import bytewax_args

    replicas = prepare(os.environ, s.cluster_port)  # in a StatefulSet pod: the Bytewax address list
    args = [*bytewax_args(s, rest), *rest]
    print(json.dumps({"tallyflow": name, "settings": s.masked(), "bytewax": args, "replicas": replicas}), file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "bytewax.run", FLOWS[name], *args])
    return 0  # pragma: no cover


def _sandbox(a: argparse.Namespace) -> int:
    from tallyflow.sandbox import Sandbox

    s = load_settings()
    with Sandbox(
        a.port,
        hmac_key=s.success_hmac_key.encode(),
        crm_token=s.crm_token,
        erp_token=s.erp_token,
        admin_token=s.sandbox_admin_token,
        host=a.host,
    ) as sb:
        print(f"sandbox on {sb.url} (open it in a browser); Ctrl-C stops it", flush=True)
        _wait_for_stop()
    return 0


def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM, then return so `with` blocks stop what they started.
    The signals must be blocked first, or their default action ends the process at once."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)


def _generate(a: argparse.Namespace) -> int:
    from tallyflow.generator import GenSpec, produce

    s = load_settings()
    spec = GenSpec(
        total=a.total,
        tenants=a.tenants,
        duplicate_pct=a.duplicates,
        late_pct=a.late,
        malformed_pct=a.malformed,
        seed=a.seed,
        rate=a.rate,
        start=datetime.fromisoformat(a.start) if a.start else GenSpec.start,
        span=timedelta(seconds=a.span) if a.span else timedelta(seconds=a.total / (a.rate or 20_000)),
    )
    kafka.ensure_reachable(kafka_config(s))
    res = produce(s.brokers, a.topic or s.input_topic, spec, load_catalog(s.catalog), config=s.kafka, progress=True)
    print(
        json.dumps(
            {
                "produced": res.produced,
                "kinds": res.kinds,
                "end_offsets": res.end_offsets,
                "events_per_s": round(res.produced / res.seconds),
            }
        )
    )
    return 0


def _stack(a: argparse.Namespace) -> int:
    from tallyflow.stack import LocalStack

    with LocalStack(redis=not a.no_redis) as st:
        s = load_settings(brokers=st.brokers)
        st.create_topics({s.input_topic: a.partitions, s.alerts_topic: 1, s.rated_topic: 1, s.dlq_topic: 1})
        print(f"export TALLYFLOW_BROKERS={st.brokers}")
        if not a.no_redis:
            print(f"export TALLYFLOW_REDIS_URL={st.redis_url}")
        print("# local stack running; Ctrl-C stops it", flush=True)
        _wait_for_stop()
    return 0


def _topics(a: argparse.Namespace) -> int:
    s = load_settings()
    kafka.ensure_reachable(kafka_config(s))
    wanted = {s.input_topic: a.partitions}
    for t in (s.alerts_topic, s.rated_topic, s.dlq_topic, s.exceptions_topic):
        wanted[t] = a.output_partitions
    short = 0
    for r in kafka.ensure_topics(kafka_config(s), wanted):
        print(f"{r.name}: {'created' if r.created else 'already existed'} with {r.partitions} partition(s)", end="")
        print(f"; {wanted[r.name]} asked, but {r.problem}" if r.problem else "")
        short += bool(r.problem)
    return 1 if short else 0


def _recovery(a: argparse.Namespace) -> int:
    from tallyflow.recovery import ensure_partitions

    s = load_settings()
    d = a.dir or s.recovery_dir
    if not d:
        raise ConfigError("no recovery directory: pass one or set TALLYFLOW_RECOVERY_DIR")
    n = a.partitions or s.recovery_partitions
    print(f"{d}: {'initialised ' + str(n) + ' partition(s)' if ensure_partitions(d, n) else 'partitions exist, left as they are'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rate"]:
        return _guard(lambda: _run_flow("rate", argv[1:]))
    if argv[:1] == ["deliver"] and argv[1:2] and argv[1] in ("alerts", "erp"):
        return _guard(lambda: _run_flow(argv[1], argv[2:]))
    ap = argparse.ArgumentParser(prog="tallyflow", description="Usage telemetry to alerts, rated usage and dead letters.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("rate", help="run the rating dataflow (any further arguments go to bytewax.run)")
    sub.add_parser("deliver", help="deliver alerts (`deliver alerts`) or rated usage (`deliver erp`); further arguments go to bytewax.run")
    sb = sub.add_parser("sandbox", help="local CRM, success-tool and ERP endpoints with fault injection")
    sb.add_argument("--port", type=int, default=8787)
    sb.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    g = sub.add_parser("generate", help="produce synthetic usage events to the input topic")
    g.add_argument("--total", type=int, default=100_000)
    g.add_argument("--tenants", type=int, default=1000)
    g.add_argument("--duplicates", type=float, default=1.0, help="percent")
    g.add_argument("--late", type=float, default=0.5, help="percent")
    g.add_argument("--malformed", type=float, default=0.1, help="percent")
    g.add_argument("--seed", type=int, default=7)
    g.add_argument("--rate", type=float, default=None, help="events/s (default: as fast as possible)")
    g.add_argument("--start", default=None, help="event time of the first event, RFC 3339")
    g.add_argument("--span", type=float, default=None, help="seconds of event time the events cover")
    g.add_argument("--topic", default=None)
    st = sub.add_parser("stack", help="run a local broker (and redis) until Ctrl-C")
    st.add_argument("--partitions", type=int, default=4)
    st.add_argument("--no-redis", action="store_true")
    t = sub.add_parser("topics", help="create the input and output topics on TALLYFLOW_BROKERS")
    t.add_argument("--partitions", type=int, default=12)
    t.add_argument("--output-partitions", type=int, default=3)
    c = sub.add_parser("check-catalog", help="validate a catalog file")
    c.add_argument("path", nargs="?")
    sub.add_parser("config", help="print the effective configuration (secrets masked)")
    sub.add_parser("demo", help="the whole pipeline locally, then a summary")
    sub.add_parser("bench", help="dataflow vs hand-written loop throughput, as JSON")
    sub.add_parser("reconcile", help="source = rated = ERP-acknowledged totals per tenant, meter and period")
    sub.add_parser("replay", help="re-rate a period from the input topic; differences go out as corrections (--dry-run)")
    sub.add_parser("dlq", help="dead letters by reason and tenant; --redrive sends fixed ones back to the input topic")
    rc = sub.add_parser("recovery", help="recovery store: `recovery init [DIR] [--partitions N]`")
    rc.add_argument("action", choices=["init"])
    rc.add_argument("dir", nargs="?")
    rc.add_argument("--partitions", type=int, default=None)
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "demo":
        from tallyflow import demo

        return demo.main(rest)
    if a.cmd == "bench":
        from tallyflow import bench

        return bench.main(rest)
    if a.cmd == "reconcile":
        from tallyflow import reconcile

        return _guard(lambda: _with_brokers(reconcile.main, rest))
    if a.cmd == "replay":
        from tallyflow.replay import main as replay_main

        return _guard(lambda: _with_brokers(replay_main, rest))
    if a.cmd == "dlq":
        from tallyflow import dlq

        return _guard(lambda: _with_brokers(dlq.main, rest))
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.cmd == "recovery":
        return _guard(lambda: _recovery(a))
    if a.cmd == "generate":
        return _guard(lambda: _generate(a))
    if a.cmd == "stack":
        return _stack(a)
    if a.cmd == "sandbox":
        return _sandbox(a)
    if a.cmd == "deliver":
        ap.error("deliver needs a destination class: alerts or erp")
    if a.cmd == "topics":
        return _guard(lambda: _topics(a))
    if a.cmd == "config":
        return _guard(lambda: print(json.dumps(load_settings().masked(), indent=2)) or 0)
    if a.cmd == "check-catalog":

        def check() -> int:
            cat = load_catalog(a.path or load_settings().catalog)
            print(f"catalog OK: {len(cat.meters)} meters, {len(cat.plans)} plans, {len(cat.tenants)} tenants")
            return 0

        return _guard(check)
    return 2  # pragma: no cover


def _guard(fn: object) -> int:
    """Configuration and catalog errors end the process with their message, not a traceback."""
    try:
        return int(fn())  # type: ignore[operator]
    except TallyflowError as e:
        print(f"tallyflow: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tallyflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
