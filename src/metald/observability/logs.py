"""The daemon's log: one JSON object per line (or the old text lines), with the call's ids.

An operator's log pipeline (journald to Loki, a container's stdout to anything) needs one
event per line with fields it does not have to parse out of prose: time, level, logger,
message, and who the line is about (vm_id, customer_id: core/callcontext.py, bound by the
API layer and the service) and which trace it belongs to (trace_id/span_id: the current span
when tracing is on, else the caller's traceparent). A record's extras (the security events'
event, reason, method, source) become keys of their own.

UNKEY_METALD_LOG_FORMAT: `json`, `text`, or `auto` (the default): JSON when stderr is not a
terminal (journald, a file, a pipe: a machine reads it), text on a terminal (a person does).
The CLI's own output (tables, messages) is not logging and is not affected.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from metald.core import callcontext, tracing

FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has: anything else on a record is an extra (logging's `extra=`).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event.update(callcontext.fields())
        ids = tracing.current_ids()
        if ids is not None:
            event["trace_id"], event["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, default=str, ensure_ascii=False)


def use_json(log_format: str, stream: TextIO) -> bool:
    if log_format not in FORMATS:
        raise ValueError(f"{log_format!r} is not one of {', '.join(FORMATS)}")
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return log_format == "json"


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """The root logger writes to `stream` (stderr) in the format asked, at `level`."""
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        JsonFormatter() if use_json(log_format, out) else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
