"""What every dataflow process does once its flow is built: logs, endpoints, cluster watch."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

from operators.stats import Stats
from runtime.cluster import ResizeWatch
from runtime.health import HEALTH, serve
from runtime.logs import setup_logging
from runtime.settings import Settings, tune_gc


def _stop(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    logging.getLogger("tallyflow").warning("%s received: stopping; the next start resumes from the last snapshot", name)
    logging.shutdown()
    os._exit(0 if signum == signal.SIGTERM else 128 + signum)


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
