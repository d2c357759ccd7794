"""What every dataflow process does once its flow is built: logs, endpoints, cluster watch."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

from operators.stats import Stats
from tallyflow.cluster import ResizeWatch
from tallyflow.config import Settings, tune_gc
from tallyflow.observability import HEALTH, serve, setup_logging


def started(s: Settings, dataflow: str, stats: Stats | None = None, **checks: Callable[[], str | None]) -> None:
    """`checks` name a readiness condition each, returning why it fails or None."""
    setup_logging(s.log_format, s.log_level, dataflow)
    logging.getLogger("tallyflow").info("tallyflow %s starting", dataflow, extra={"settings": s.masked()})
    HEALTH.checks.update(checks)
    serve(s.metrics_port, dataflow, stats)
    ResizeWatch.start(os.environ, s.cluster_check_seconds)
    # As PID 1 in a container, SIGTERM has no default action: without a handler a pod would
    # wait out its grace period and be killed. Stop as on Ctrl-C; a restart resumes from
    # the last snapshot (what happened after it is replayed, harmlessly).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    HEALTH.built = True
    tune_gc()
