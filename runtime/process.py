"""What every dataflow process does once its flow is built: logs, endpoints, cluster watch."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from operators.stats import Stats
from runtime.cluster import ResizeWatch
from runtime.health import HEALTH, serve
from runtime.logs import setup_logging
from runtime.settings import ConfigError, Settings, tune_gc


def _stop(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    logging.getLogger("tallyflow").warning("%s received: stopping; the next start resumes from the last snapshot", name)
    logging.shutdown()
    os._exit(0 if signum == signal.SIGTERM else 128 + signum)


def worker_threads(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Worker threads per process that `bytewax.run` would start (`-w N`, `-wN`,
    `--workers-per-process N|=N`, or BYTEWAX_WORKERS_PER_PROCESS); 1 when unsaid."""
    value: str | None = env.get("BYTEWAX_WORKERS_PER_PROCESS")
    args = list(argv)
    for i, a in enumerate(args):
        if a in ("-w", "--workers-per-process") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--workers-per-process="):
            value = a.split("=", 1)[1]
        elif a.startswith("-w") and len(a) > 2 and not a.startswith("--"):
            value = a[2:]
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1  # bytewax.run reports its own malformed option


def one_worker_per_process(dataflow: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Refuse worker threads: the threads of one process share the GIL (no speed-up) and
    every object handed to the dataflow (validator, counters, stores' caches), which are
    built for one worker. Processes scale, each with its own."""
    n = worker_threads(argv, env)
    if n > 1:
        raise ConfigError(
            f"{dataflow}: -w {n} (worker threads) is not supported: threads of one process share the GIL and the "
            "dataflow's state; run one worker per process and scale with processes (-i/-a, or the StatefulSet: README "
            "'Scale workers')"
        )


def refuse_worker_threads(dataflow: str) -> None:
    """`one_worker_per_process` for a `bytewax.run` entry point: one line on stderr, exit 2."""
    try:
        one_worker_per_process(dataflow, sys.argv, os.environ)
    except ConfigError as e:
        print(f"tallyflow: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def started(s: Settings, dataflow: str, stats: Stats | None = None, **checks: Callable[[], str | None]) -> None:
    """`checks` name a readiness condition each, returning why it fails or None."""
    setup_logging(s.process.log_format, s.process.log_level, dataflow)
    logging.getLogger("tallyflow").info("tallyflow %s starting", dataflow, extra={"settings": s.masked()})
    HEALTH.checks.update(checks)
    serve(s.process.metrics_port, dataflow, stats)
    ResizeWatch.start(os.environ, s.process.cluster_check_seconds)
    # As PID 1 in a container, SIGTERM has no default action: without a handler a pod would
    # wait out its grace period and be killed. And Bytewax turns Ctrl-C into a Rust panic
    # with a backtrace. So both stop the process at once, with one line: a restart resumes
    # from the last snapshot, and what happened after it is replayed harmlessly (the same
    # guarantees that make kill -9 safe).
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    HEALTH.built = True
    tune_gc()
