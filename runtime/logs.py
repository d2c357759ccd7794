"""JSON logs that carry correlation ids, one object per line."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Fields passed with `extra=` (alert_id, correlation_id,
    line_ids, batch_id, ...) become top-level keys, so one search follows an event to its
    alert, a rated line to its ERP batch."""

    def __init__(self, dataflow: str) -> None:
        super().__init__()
        self.static = {"dataflow": dataflow, "pod": os.environ.get("BYTEWAX_POD_NAME") or socket.gethostname()}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                # A field never overwrites the record's own ("level" of an alert is not the
                # log level): it is kept beside it instead.
                out[f"{k}_field" if k in out else k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(fmt: str, level: str, dataflow: str) -> None:
    """Route this process's logs to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(dataflow))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {dataflow} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):  # a line per request would drown the correlation logs
        logging.getLogger(noisy).setLevel(logging.WARNING)
