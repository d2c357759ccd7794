"""The `tallyflow` command: every dataflow, operations tool and the local development kit.

Every subcommand's `--help` lists its options; every error a person must fix
(`TallyflowError`: a setting, the catalog, an unreachable broker) is one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dataflows import FLOWS
from runtime import kafka
from runtime.settings import KAFKA_PREFIX, ConfigError, env_name, load_settings, to_env
from schemas.catalog import load_catalog
from schemas.errors import TallyflowError

OVERVIEW = """\
run the pipeline:      rate, deliver alerts, deliver erp, api
operate it:            topics, config, check-catalog, recovery, reconcile, replay, dlq, exceptions, invoice, review, erp-status
develop and try it:    stack, sandbox, generate, demo, bench

Settings come from TALLYFLOW_* variables (and an optional YAML file named by
TALLYFLOW_CONFIG); `tallyflow config` prints them. See README.md and ARCHITECTURE.md."""

BYTEWAX_HELP = """\
Any further arguments go to `python -m bytewax.run` unchanged: -i I -a HOST:PORT,... (a
cluster of processes, one worker each: the way to scale; -w N worker threads are refused,
as threads share the GIL and the dataflow's objects), -r DIR -s SECONDS -b SECONDS (recovery; added for you when
TALLYFLOW_RECOVERY_DIR is set). In a StatefulSet pod the cluster comes from the pod's
environment. SIGTERM or Ctrl-C stop it; the next start resumes from the last snapshot."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default where it has a meaningful one."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {default})"


# -- the dataflows ---------------------------------------------------------------------------


def _run_flow(name: str, rest: list[str]) -> int:
    """Replace this process with `python -m bytewax.run` on a flow, so every Bytewax option
    (-w, -i/-a, -r/-s/-b, the StatefulSet environment) works unchanged."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # PID 1 in a pod: stop even before Bytewax runs
    from runtime.process import one_worker_per_process

    one_worker_per_process(f"tallyflow {'rate' if name == 'rate' else 'deliver ' + name}", rest, os.environ)
    s = load_settings()
    if name == "rate":
        load_catalog(s.process.catalog)  # fail fast, with the field named, before Bytewax starts
    kafka.ensure_reachable(s.kafka.config())
    from runtime.cluster import prepare
    from runtime.recovery import bytewax_args

    replicas = prepare(os.environ, s.process.cluster_port)  # in a StatefulSet pod: the Bytewax address list
    args = [*bytewax_args(s.process, rest), *rest]
    cluster = f", a cluster of {replicas}" if replicas else ""
    print(f"tallyflow {name}: bytewax.run {FLOWS[name]} {' '.join(args)}{cluster}".rstrip(), file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "bytewax.run", FLOWS[name], *args])
    return 0  # pragma: no cover


# -- operating it ----------------------------------------------------------------------------


def _topics(a: argparse.Namespace) -> int:
    s = load_settings()
    kafka.ensure_reachable(s.kafka.config())
    t = s.topics
    wanted = {
        t.input: a.partitions,
        **dict.fromkeys((t.alerts, t.rated, t.dlq, t.exceptions, t.credits, t.review, t.audit), a.output_partitions),
    }
    short = 0
    for r in kafka.ensure_topics(s.kafka.config(), wanted):
        print(f"{r.name}: {'created' if r.created else 'already existed'} with {r.partitions} partition(s)", end="")
        print(f"; {wanted[r.name]} asked, but {r.problem}" if r.problem else "")
        short += bool(r.problem)
    return 1 if short else 0


def _shell(v: Any) -> str:
    """A setting's value as its variable takes it, quoted for a shell where needed."""
    text = "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return shlex.quote(text) if text else ""


def _config(a: argparse.Namespace) -> int:
    flat = load_settings().masked()
    if a.json:
        print(json.dumps(flat, indent=2))
        return 0
    librdkafka: dict[str, Any] = flat.pop("kafka")
    lines = [f"{env_name(name)}={_shell(v)}" for name, v in flat.items()]
    lines += [f"{KAFKA_PREFIX}{k.upper().replace('.', '_')}={_shell(v)}" for k, v in sorted(librdkafka.items())]
    print("\n".join(lines))
    return 0


def _check_catalog(a: argparse.Namespace) -> int:
    cat = load_catalog(a.path or load_settings().process.catalog)
    print(f"catalog OK: {len(cat.meters)} meters, {len(cat.plans)} plans, {len(cat.tenants)} tenants")
    return 0


def _recovery(a: argparse.Namespace) -> int:
    from runtime.recovery import ensure_partitions

    s = load_settings()
    d = a.dir or s.process.recovery_dir
    if not d:
        raise ConfigError("no recovery directory: pass one or set TALLYFLOW_RECOVERY_DIR")
    n = a.partitions or s.process.recovery_partitions
    print(f"{d}: {'initialised ' + str(n) + ' partition(s)' if ensure_partitions(d, n) else 'partitions exist, left as they are'}")
    return 0


def _with_brokers(
    run: Callable[[argparse.Namespace], int], check: Callable[[argparse.Namespace], None] | None = None
) -> Callable[[argparse.Namespace], int]:
    """Tools that need the brokers stop at once, with one line, when they do not answer; their
    arguments are checked first (a typo is one line whether or not the brokers answer)."""

    def wrapped(a: argparse.Namespace) -> int:
        if check is not None:
            check(a)
        kafka.ensure_reachable(load_settings().kafka.config())
        return run(a)

    return wrapped


# -- the local development kit --------------------------------------------------------------


def _api(a: argparse.Namespace) -> int:
    from serving.server import serve

    s = load_settings()
    workers = a.workers or s.api.workers
    return serve(s, a.host or s.api.host, a.port or s.api.port, workers=workers)


def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM, then return so `with` blocks stop what they started.
    The signals must be blocked first, or their default action ends the process at once."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)


def _stack(a: argparse.Namespace) -> int:
    from devkit.stack import LocalStack

    with LocalStack(redis=not a.no_redis) as st, contextlib.ExitStack() as more:
        s = load_settings(brokers=st.brokers)
        t = s.topics
        outputs = (t.alerts, t.rated, t.dlq, t.exceptions, t.credits, t.review, t.audit, t.status)
        st.create_topics({t.input: a.partitions, **dict.fromkeys(outputs, 1)})
        print(f"export TALLYFLOW_BROKERS={st.brokers}")
        if not a.no_redis:
            print(f"export TALLYFLOW_REDIS_URL={st.redis_url}")
        if a.tryton:
            from devkit.tryton import TrytonServer, template

            print("# setting up Tryton (company, chart, products and parties of the catalog; ~30 s the first time)", flush=True)
            tryton = more.enter_context(TrytonServer(template(s.process.catalog), Path(st.workdir) / "tryton"))
            for k, v in to_env(tryton.settings(s)).items():
                if k.startswith("TALLYFLOW_TRYTON_"):
                    print(f"export {k}={v}")
            print("export TALLYFLOW_ERP_KIND=tryton TALLYFLOW_CRM_KIND=tryton")
        print(f"# local stack running; topics created ({t.input} with {a.partitions} partitions); Ctrl-C stops it", flush=True)
        _wait_for_stop()
    return 0


def _sandbox(a: argparse.Namespace) -> int:
    from devkit.sandbox import Sandbox

    s = load_settings()
    with Sandbox(
        a.port,
        hmac_key=s.success.hmac_key.encode(),
        crm_token=s.crm.token,
        erp_token=s.erp.token,
        admin_token=s.sandbox.admin_token,
        host=a.host,
    ) as sb:
        print(f"sandbox on {sb.url} (open it in a browser); Ctrl-C stops it", flush=True)
        _wait_for_stop()
    return 0


def _start(text: str | None) -> datetime | None:
    """--start as an aware UTC time (the generator writes event times in UTC)."""
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--start '{text}': not an RFC 3339 time; write e.g. 2026-10-31T12:00:00Z") from None
    if t.tzinfo is None:
        raise ConfigError(f"--start '{text}': no time zone; add Z or an offset, e.g. {text}Z")
    return t.astimezone(UTC)


def _generate(a: argparse.Namespace) -> int:
    from devkit.generator import GenSpec, produce

    start = _start(a.start)
    s = load_settings()
    kafka.ensure_reachable(s.kafka.config())
    spec = GenSpec(
        total=a.total,
        tenants=a.tenants,
        duplicate_pct=a.duplicates,
        late_pct=a.late,
        malformed_pct=a.malformed,
        seed=a.seed,
        rate=a.rate,
        start=start or GenSpec.start,
        span=timedelta(seconds=a.span) if a.span else timedelta(seconds=a.total / (a.rate or 20_000)),
    )
    cat = load_catalog(s.process.catalog)
    res = produce(s.kafka.brokers, a.topic or s.topics.input, spec, cat, config=s.kafka.librdkafka, progress=True)
    out = {"produced": res.produced, "kinds": res.kinds, "end_offsets": res.end_offsets, "events_per_s": round(res.produced / res.seconds)}
    print(json.dumps(out))
    return 0


# -- the parser ----------------------------------------------------------------------------------


GENERATE_DOC = """\
Produce synthetic usage events to the input topic, as product services would: CloudEvents
from the catalog's first --tenants tenants (TALLYFLOW_CATALOG), of every event type its
meters read, with plausible data (quantities, gauges, user ids, seat counts, model names for
matrix meters), keyed by tenant. Event times run from --start over --span seconds of event
time; a share of the events are sent twice (--duplicates), late (--late: minutes late, some
hours, past their period) or malformed (--malformed: each a dead letter with its reason), so
dedup, corrections and dead letters all have work. The same --seed makes the same traffic.
Prints one JSON line: events produced, by kind, the topic's end offsets and the rate reached.

Example: tallyflow generate --total 200000 --rate 20000"""

API_DOC = """\
Run the HTTP API (uvicorn, one process; TALLYFLOW_API_* settings). Clients authenticate with
bearer tokens from TALLYFLOW_API_TOKENS_FILE, each with scopes (ingest, read), an events/s
rate and optionally the tenants it serves.

  POST /v1/events                     CloudEvents (one, or a batch as an array; scope ingest):
                                      judged by the rating validator, produced to the input
                                      topic keyed by tenant, answered after the broker's acks
  GET  /v1/tenants/{t}/usage          a tenant's billing period to date from the read model
       ?period=YYYY-MM&meter=M        (scope read): per meter quantity, used / included /
                                      remaining / overage, amount and the part rated so far,
                                      thresholds crossed, matrix cells; the current period
                                      by default
  GET  /v1/tenants/{t}/entitlements/{meter}?period=
                                      has_access, included, used, remaining, overage
  GET  /tenants/{t}?period=&tz=+01:00 the usage page for people (HTML, no script; the read
                                      token as the Basic password): a bar per meter against
                                      what is included, thresholds, amounts rated and not yet,
                                      matrix cells, spend alerts, times in the given UTC offset
  GET  /openapi.json                  the OpenAPI 3.1 document of all of it
  GET  /metrics, /healthz, /readyz    Prometheus metrics, liveness, readiness (broker and Redis)

Queries read only Redis (the read model the rating dataflow writes) and the catalog."""


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser(
        "generate", help="produce synthetic usage events to the input topic", description=GENERATE_DOC, formatter_class=_Formatter
    )
    g.add_argument("--total", type=int, default=100_000, help="events to produce")
    g.add_argument("--tenants", type=int, default=1000, help="tenants of the catalog that send them")
    g.add_argument("--duplicates", type=float, default=1.0, help="percent sent twice")
    g.add_argument("--late", type=float, default=0.5, help="percent with an event time minutes to hours late")
    g.add_argument("--malformed", type=float, default=0.1, help="percent malformed (each a dead letter)")
    g.add_argument("--seed", type=int, default=7, help="same seed, same traffic")
    g.add_argument("--rate", type=float, default=None, help="events/s (default: as fast as possible)")
    g.add_argument("--start", default=None, help="event time of the first event, RFC 3339 (default: 2026-10-31T12:00Z)")
    g.add_argument("--span", type=float, default=None, help="seconds of event time the events cover (default: total / 20k)")
    g.add_argument("--topic", default=None, help="topic to produce to (default: TALLYFLOW_INPUT_TOPIC)")
    g.set_defaults(run=_generate)


def parser() -> argparse.ArgumentParser:
    from devkit import bench, demo
    from ops import dlq, exceptions, invoice, reconcile, replay, review, status

    ap = argparse.ArgumentParser(
        prog="tallyflow",
        description="Usage telemetry from Kafka to threshold alerts, rated usage and dead letters.",
        epilog=OVERVIEW,
        formatter_class=_Formatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, run: Callable[[argparse.Namespace], int], doc: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=doc or help, formatter_class=_Formatter)
        p.set_defaults(run=run)
        return p

    r = cmd("rate", "run the rating dataflow (tails the input topic)", lambda a: _run_flow("rate", a.bytewax))
    r.usage, r.epilog = "tallyflow rate [BYTEWAX OPTIONS]", BYTEWAX_HELP
    d = cmd(
        "deliver",
        "run a delivery dataflow: alerts (CRM, success tool), erp, or status (invoice states to the CRM)",
        lambda a: _run_flow(a.what, a.bytewax),
    )
    d.usage, d.epilog, d.formatter_class = (
        "tallyflow deliver {alerts,erp,status} [BYTEWAX OPTIONS]",
        BYTEWAX_HELP,
        argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "what",
        choices=["alerts", "erp", "status"],
        help="alerts: to the CRM and the success tool; erp: rated usage to the ERP; status: invoice states to the CRM",
    )
    api = cmd("api", "the HTTP API: event ingest, usage and entitlement queries, the usage page", _api, API_DOC)
    api.add_argument("--host", default=None, help="address to listen on (default: TALLYFLOW_API_HOST)")
    api.add_argument("--port", type=int, default=None, help="port (default: TALLYFLOW_API_PORT)")
    api.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes behind one port, each with its own cache (default: TALLYFLOW_API_WORKERS, 1)",
    )

    t = cmd("topics", "create the input and output topics on TALLYFLOW_BROKERS and say what they have", _topics)
    t.add_argument("--partitions", type=int, default=12, help="partitions of the input topic (the most useful rating workers)")
    t.add_argument("--output-partitions", type=int, default=3, help="partitions of each output topic")
    cf = cmd("config", "print the effective configuration as TALLYFLOW_* variables, one a line (secrets masked)", _config)
    cf.add_argument("--json", action="store_true", help="print JSON by setting name (as in the TALLYFLOW_CONFIG file) for machines")
    c = cmd("check-catalog", "validate a catalog file; a problem is named with its field and the fix", _check_catalog)
    c.add_argument("path", nargs="?", help="catalog file (default: TALLYFLOW_CATALOG)")
    rc = cmd("recovery", "set up a Bytewax recovery store: `recovery init [DIR] [--partitions N]`", _recovery)
    rc.add_argument("action", choices=["init"], help="init: create the partitions unless some exist")
    rc.add_argument("dir", nargs="?", help="recovery directory (default: TALLYFLOW_RECOVERY_DIR)")
    rc.add_argument("--partitions", type=int, default=None, help="partitions to create (default: TALLYFLOW_RECOVERY_PARTITIONS)")
    for mod, name, what in (
        (reconcile, "reconcile", "source = rated = ERP-acknowledged totals per tenant, meter and period"),
        (replay, "replay", "re-rate billing periods from the input topic; differences go out as corrections"),
        (dlq, "dlq", "dead letters by reason and tenant; --redrive sends fixed ones back to the input topic"),
        (exceptions, "exceptions", "what destinations rejected for good; --redrive sends it again once fixed"),
        (invoice, "invoice", "invoice a period in Tryton; rated = in Tryton = invoiced per customer"),
        (review, "review", "lines held for review before the ERP: list, approve or reject them (who, when, why kept)"),
        (status, "erp-status", "poll Tryton's invoices and tell each state they reach (erp.status) for the CRM"),
    ):
        mod.add_arguments(cmd(name, what, _with_brokers(mod.run, getattr(mod, "check", None)), mod.__doc__))

    st = cmd("stack", "run a local broker and redis-server until Ctrl-C; prints the variables to export", _stack)
    st.add_argument("--partitions", type=int, default=4, help="partitions of the input topic it creates")
    st.add_argument("--no-redis", action="store_true", help="the broker only")
    st.add_argument("--tryton", action="store_true", help="also Tryton (SQLite) as the ERP and CRM, set up from the catalog")
    sb = cmd("sandbox", "local CRM, success-tool and ERP endpoints with fault injection, until Ctrl-C", _sandbox)
    sb.add_argument("--port", type=int, default=8787, help="port to listen on")
    sb.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    _add_generate(sub)
    for mod, name, what in (
        (demo, "demo", "the whole pipeline locally on embedded defaults, then a summary"),
        (bench, "bench", "throughput and latency against the lean reference loop, as one JSON object"),
    ):
        mod.add_arguments(cmd(name, what, mod.run, mod.__doc__))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    a, rest = p.parse_known_args(argv)
    if rest and a.cmd not in ("rate", "deliver"):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    a.bytewax = rest  # rate and deliver hand them to bytewax.run
    try:
        rc = int(a.run(a))
        sys.stdout.flush()  # here, so a reader that has gone (`| head`) is met below, not at exit
        return rc
    except TallyflowError as e:
        print(f"tallyflow: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tallyflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # The reader stopped reading (`tallyflow config | head`): end quietly, as a tool killed
        # by SIGPIPE would; what is still buffered goes nowhere instead of to a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (not some socket of a command's own)."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
