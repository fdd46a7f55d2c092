"""Structured logs: JSON lines (default when stderr is not a terminal) with trace ids.

configure_logging(settings.logging)
log.info("gRPC ingest listening", extra={"address": "127.0.0.1:4320"})
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

from agent.config import LoggingSettings

# Attributes every LogRecord has; anything else came from ``extra=`` and is logged as a field.
# uvicorn adds "color_message" (the message with ANSI colours) to its records.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = format(span.trace_id, "032x")
        fields["span_id"] = format(span.span_id, "016x")
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value if isinstance(value, str | int | float | bool) else str(value)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for terminals, extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{line} {extra}" if extra else line


def configure_logging(settings: LoggingSettings, stream: Any = None) -> logging.Handler:
    """Install one stderr handler on the root logger (replacing ours from an earlier call)."""
    stream = stream or sys.stderr
    use_json = settings.format == "json" or (
        settings.format == "auto" and not getattr(stream, "isatty", lambda: False)()
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.set_name("mlsidecar")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "mlsidecar":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.level)
    return handler
