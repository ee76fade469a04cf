"""Logging for the service: one handler on stderr, text for people or JSON for machines.

``log_format: text`` writes ``2026-01-02 10:00:00,123 INFO dynllm.requests: ...``;
``log_format: json`` writes one JSON object per line with ``time`` (ISO-8601,
UTC, milliseconds), ``level``, ``logger`` and ``message``, then every field a
caller passed as ``extra=`` (``log.info("...", extra={"model": m, "status": 200})``
adds ``"model"`` and ``"status"``), and ``exception`` with the traceback when
there is one.  A log shipper (journald's JSON, Loki, Vector) then reads fields
instead of parsing prose.

uvicorn's own lines go through the same handler (``uvicorn_log_options``), so
a JSON log has no stray text line in it.

Written here rather than taken from python-json-logger: the whole job is
``json.dumps`` of a record's fields, about thirty lines, and this keeps the
output under our control (field names, the UTC timestamp, what counts as an
extra field) without another dependency to track.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
# Extra fields that are presentation, not data: uvicorn adds an ANSI-coloured
# copy of some messages.
_DROPPED_EXTRAS = frozenset({"color_message"})
_OWN_FIELDS = ("time", "level", "logger", "message", "exception", "stack")

# Libraries that log one line per upstream request or job run below warning.
_NOISY = ("httpx", "httpcore", "apscheduler")
# At debug dynllm and its backends are the point; the SQLite driver would log
# every statement.
_NOISY_AT_DEBUG = ("aiosqlite",)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key in _DROPPED_EXTRAS:
                continue
            # An extra named like one of ours must not overwrite it (a "level"
            # extra replacing the record's level would mislead every filter).
            entry[f"extra.{key}" if key in _OWN_FIELDS else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold (a Path, an enum, a
        # datetime) is written as its text instead of losing the whole line.
        return json.dumps(entry, ensure_ascii=False, default=str)


class _DynllmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs, told apart from others
    (a test runner's capture handler stays)."""


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Route every logger (dynllm's, uvicorn's, the libraries') through one
    stderr handler at ``level`` in ``log_format``; quiet the chatty libraries."""
    numeric = logging.getLevelName(level.upper())
    handler = _DynllmHandler(sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DynllmHandler)]:
        root.removeHandler(old)  # a second call replaces, never doubles, the output
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)  # Python warnings become records in the same format
    for name in _NOISY_AT_DEBUG if numeric <= logging.DEBUG else _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def uvicorn_log_options() -> dict[str, Any]:
    """uvicorn's options so it logs through the root handler: without
    ``log_config=None`` uvicorn installs its own text handlers and a JSON log
    would carry its lines in another format."""
    return {"log_config": None}
