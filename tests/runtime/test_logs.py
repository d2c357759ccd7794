"""JSON logs: correlation ids as fields, and a field never overwrites the record's own."""

from __future__ import annotations

import logging

import orjson

from runtime.logs import JsonFormatter


def test_fields_never_collide_with_the_log_records_own():
    rec = logging.LogRecord("tallyflow", logging.INFO, __file__, 1, "threshold alert", None, None)
    rec.__dict__.update({"level": "80%", "alert_id": "a-1", "msg_id": 3})
    out = orjson.loads(JsonFormatter("rating").format(rec))
    assert out["level"] == "info" and out["level_field"] == "80%"
    assert out["alert_id"] == "a-1" and out["msg"] == "threshold alert" and out["dataflow"] == "rating"
